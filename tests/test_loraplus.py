"""LoRA+: optimizer parameter groups with relative rates, LoRA+'s two groups, and the loraplus method end to end
(training, the saved adapter, checkpoints and resume)."""
import dataclasses
import math

import numpy as np
import pytest

import minilora as ml
from minilora import data, finetune, tokenizer, train
from minilora.core.loraplus import loraplus_groups, optimizer_groups
from minilora.core.methods import MethodSettings, apply_method, loraplus_config
from minilora.io.adapter_files import load_lora, read_lora
from minilora.nn import Parameter

from helpers import host

TINY = dict(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=16)
SMALL_LORA = ml.LoRAConfig(r=2, alpha=4.0)


def lora_model(ratio=None, dtype="float64", **lora):
    model = ml.GPT(ml.GPTConfig(**TINY), seed=1, dtype=dtype)
    return ml.apply_lora(model, dataclasses.replace(SMALL_LORA, loraplus_ratio=ratio, **lora), seed=2)


def set_random_grads(params, rng, scale=1.0):
    for p in params:
        p.grad = ml.backend.asarray(rng.standard_normal(p.shape).astype(host(p.data).dtype) * scale)


# ----------------------------------------------------------------------------------------------------
# parameter groups


@pytest.mark.parametrize("make", [
    lambda ps, **kw: ml.AdamW(ps, lr=0.02, weight_decay=0.1, **kw),
    lambda ps, **kw: ml.SGD(ps, lr=0.05, momentum=0.9, **kw),
], ids=["AdamW", "SGD"])
def test_groups_with_ratio_one_are_bit_identical_to_no_groups(make):
    models = [lora_model(), lora_model()]
    for p in models[0].parameters(trainable_only=True) + models[1].parameters(trainable_only=True):
        p.data[...] = ml.backend.asarray(np.random.default_rng(p.size).standard_normal(p.shape))   # B != 0
        p.decay = p.data.ndim == 2                                             # decayed and not, both kinds
    plain = make(models[0].parameters())
    a, b = loraplus_groups(models[1], 1.0)
    grouped = make([a, {**b, "lr_ratio": 1}])
    for step in range(4):
        for model, opt in ((models[0], plain), (models[1], grouped)):
            set_random_grads(model.parameters(trainable_only=True), np.random.default_rng(step))
            opt.lr *= 0.7                                                      # as a schedule would
            opt.step()
    for (name, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert np.array_equal(host(p.data), host(q.data)), name


def test_adamw_groups_match_torch_with_absolute_group_rates():
    """minilora: one lr (set every step, as the schedule does) times each group's ratio; torch: each group's own
    absolute lr, set to lr and lr * lambda every step. Both take the same float lr * lambda, so any difference
    is the rounding of AdamW's arithmetic (torch's lerp for m, its order of operations): a few ulps per step on
    parameters of order 1, far below 1e-12, while a wrong rate in either group moves a parameter by ~lr."""
    torch = pytest.importorskip("torch")
    ratio, lrs, wd = 16.0, [0.01, 0.02, 0.015, 0.005, 0.001], 0.1
    model = lora_model(ratio)
    rng = np.random.default_rng(0)
    for p in model.parameters(trainable_only=True):
        p.data[...] = ml.backend.asarray(rng.standard_normal(p.shape))
    groups = optimizer_groups(model)
    assert [g.get("lr_ratio", 1.0) for g in groups] == [1.0, ratio]
    ours = ml.AdamW(groups, lr=lrs[0], betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    theirs = [[torch.tensor(host(p.data).copy(), requires_grad=True) for p in g["params"]] for g in groups]
    topt = torch.optim.AdamW([{"params": theirs[0], "lr": lrs[0]}, {"params": theirs[1], "lr": lrs[0] * ratio}],
                             betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    assert all(not p.decay for g in groups for p in g["params"])      # LoRA's factors: decay 0 on both sides
    topt.param_groups[0]["weight_decay"] = topt.param_groups[1]["weight_decay"] = 0.0
    for step, lr in enumerate(lrs):
        ours.lr = lr
        topt.param_groups[0]["lr"], topt.param_groups[1]["lr"] = lr, lr * ratio
        for g, tg in zip(groups, theirs):
            for p, t in zip(g["params"], tg):
                grad = rng.standard_normal(p.shape) * (step + 1)
                p.grad = ml.backend.asarray(grad)
                t.grad = torch.tensor(grad)
        ours.step()
        topt.step()
    for g, tg in zip(groups, theirs):
        for p, t in zip(g["params"], tg):
            np.testing.assert_allclose(host(p.data), t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_a_group_steps_at_its_ratio_of_lr():
    lr, ratio = 0.1, 3.0
    p, q = Parameter(np.ones(2)), Parameter(np.ones(2))
    for param in (p, q):
        param.grad = np.array([1.0, -2.0])
    ml.SGD([{"params": [p]}, {"params": [q], "lr_ratio": ratio}], lr=lr).step()
    np.testing.assert_allclose(p.data, 1 - lr * np.array([1.0, -2.0]), rtol=1e-15)
    np.testing.assert_allclose(q.data, 1 - lr * ratio * np.array([1.0, -2.0]), rtol=1e-15)
    # AdamW's first step is lr * g / (|g| + eps): each group's step is its own rate; weight decay per group
    p, q = Parameter(np.ones(2), decay=True), Parameter(np.ones(2), decay=True)
    for param in (p, q):
        param.grad = np.array([1.0, -2.0])
    ml.AdamW([{"params": p, "weight_decay": 0.0}, {"params": [q], "lr_ratio": ratio}], lr=lr,
             weight_decay=0.5).step()
    sign = np.array([1.0, -1.0])
    np.testing.assert_allclose(p.data, 1 - lr * sign, rtol=1e-7)
    np.testing.assert_allclose(q.data, (1 - lr * ratio * 0.5) - lr * ratio * sign, rtol=1e-7)


def one_group(**fields):
    return lambda p, q: [{"params": [p], **fields}]


@pytest.mark.parametrize("groups, error, match", [
    (lambda p, q: [{"params": [p]}, {"params": [p, q]}], ValueError, "appears twice.*in group 1"),
    (lambda p, q: [p, p], ValueError, "appears twice"),
    (one_group(lr_ratio=0.0), ValueError, r"group 0's lr_ratio must be a finite number > 0; got 0\.0"),
    (one_group(lr_ratio=-2), ValueError, "lr_ratio must be a finite number > 0"),
    (one_group(lr_ratio=math.inf), ValueError, "lr_ratio must be a finite number > 0; got inf"),
    (one_group(lr_ratio=math.nan), ValueError, "lr_ratio must be a finite number > 0; got nan"),
    (one_group(lr_ratio="16"), ValueError, "lr_ratio must be a finite number > 0; got '16'"),
    (one_group(lr_ratio=True), ValueError, "lr_ratio must be a finite number"),
    (one_group(weight_decay=-1.0), ValueError, "group 0's weight_decay must be a finite number >= 0"),
    (one_group(lr=1e-3), ValueError, r"unknown keys \['lr'\].*lr_ratio multiplies"),
    (lambda p, q: [{"lr_ratio": 2.0}], ValueError, "group 0 has no 'params'"),
    (lambda p, q: [{"params": [p]}, q], TypeError, "not a mixture"),
    (lambda p, q: [{"params": [p, np.zeros(2)]}], TypeError,
     r"Parameters \(model.parameters\(\)\) in parameter group 0; got ndarray"),
])
def test_bad_parameter_groups_are_refused_with_a_clear_error(groups, error, match):
    p, q = Parameter(np.ones(2)), Parameter(np.ones(3))
    with pytest.raises(error, match=match):
        ml.AdamW(groups(p, q), lr=1e-3)


def test_sgd_groups_have_no_weight_decay():
    with pytest.raises(ValueError, match=r"SGD parameter group 0 has unknown keys \['weight_decay'\]"):
        ml.SGD([{"params": [Parameter(np.ones(2))], "weight_decay": 0.1}], lr=0.1)


# ----------------------------------------------------------------------------------------------------
# LoRA+'s groups


def test_loraplus_groups_put_every_lora_B_and_only_those_in_the_fast_group():
    model = lora_model(16.0, bias="all", targets=("q_proj", "v_proj", "fc"))
    a, b = loraplus_groups(model, 4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert b["lr_ratio"] == 4.0 and "lr_ratio" not in a
    assert sorted(names[id(p)] for p in b["params"]) == sorted(
        f"h.{l}.{m}.lora_B" for l in range(2) for m in ("attn.q_proj", "attn.v_proj", "mlp.fc"))
    in_a = {names[id(p)] for p in a["params"]}
    assert in_a == {n for n, p in model.named_parameters(trainable_only=True) if not n.endswith(".lora_B")}
    assert any(n.endswith(".lora_A") for n in in_a) and any(n.endswith(".bias") for n in in_a)   # biases: eta_A
    assert [len(g["params"]) for g in optimizer_groups(model)] == [len(a["params"]), len(b["params"])]
    assert optimizer_groups(model)[1]["lr_ratio"] == 16.0                  # the ratio of the model's config
    plain = lora_model()
    assert [len(g["params"]) for g in optimizer_groups(plain)] == [len(plain.parameters(trainable_only=True))]


def test_loraplus_needs_lora_layers_and_a_positive_ratio():
    with pytest.raises(ValueError, match="needs LoRA layers"):
        loraplus_groups(ml.GPT(ml.GPTConfig(**TINY), seed=0), 16.0)
    for bad in (0, -1.0, math.inf, math.nan, "16", None):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            loraplus_groups(lora_model(), bad)
        if bad is not None:
            with pytest.raises(ValueError, match="LoRAConfig.loraplus_ratio must be None or a finite number > 0"):
                ml.LoRAConfig(loraplus_ratio=bad)
            with pytest.raises(ValueError, match="MethodSettings.loraplus_ratio .* must be a finite number > 0"):
                MethodSettings(loraplus_ratio=bad)


def test_the_loraplus_method_is_lora_with_the_ratio_of_its_settings():
    settings = MethodSettings(lora=SMALL_LORA, loraplus_ratio=8.0)
    model = apply_method(ml.GPT(ml.GPTConfig(**TINY), seed=0), "loraplus", settings)
    assert model.lora_config == dataclasses.replace(SMALL_LORA, loraplus_ratio=8.0)
    lora = apply_method(ml.GPT(ml.GPTConfig(**TINY), seed=0), "lora", settings)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in lora.named_parameters()]
    assert lora.lora_config.loraplus_ratio is None
    with pytest.raises(ValueError, match="LoRA\\+ ratio given twice"):
        loraplus_config(MethodSettings(lora=dataclasses.replace(SMALL_LORA, loraplus_ratio=4.0)))
    agreeing = MethodSettings(lora=dataclasses.replace(SMALL_LORA, loraplus_ratio=16.0))
    assert loraplus_config(agreeing).loraplus_ratio == 16


def test_fit_moves_B_lambda_times_as_far_as_A_on_the_first_step():
    """AdamW's first step moves an entry by lr * |g| / (|g| + eps): about the rate wherever |g| >> eps, so the
    largest move of a factor is its rate: lambda times the scheduled rate for B, the rate itself for A."""
    ratio = 16.0
    model = lora_model(ratio, dtype="float64")
    for _, layer in ml.lora.lora_modules(model):               # B != 0, so that A has a gradient too
        layer.lora_B.data[...] = ml.backend.asarray(np.random.default_rng(0).standard_normal(layer.lora_B.shape))
    before = {n: host(p.data).copy() for n, p in model.named_parameters(trainable_only=True)}
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=400)
    config = train.TrainConfig(steps=1, batch_size=2, block_size=8, lr=1e-3, min_lr=0.0, warmup_steps=0,
                               weight_decay=0.0, eval_every=0, checkpoint_every=0, quiet=True, threads=1)
    train.fit(model, ids, None, config)
    for n, p in model.named_parameters(trainable_only=True):
        rate = config.lr * (ratio if n.endswith("lora_B") else 1.0)
        largest = np.abs(host(p.data) - before[n]).max()
        # at most the rate; below it by eps / |g| < 1e-3 for the largest gradient entry (|g| > 1e-5 = 1000 eps)
        assert rate * (1 - 1e-3) < largest <= rate * (1 + 1e-12), n


# ----------------------------------------------------------------------------------------------------
# the loraplus fine-tune: saved adapter, checkpoints, resume


def toy_corpus():
    text = data.toy_text("reverse", 300, seed=0)
    ids = tokenizer.encode(text)
    return data.Corpus("toy-reverse", "toy", text, ids[:2000], ids[2000:])


def config(out_dir, **overrides):
    fields = dict(steps=6, batch_size=4, block_size=16, warmup_steps=1, eval_every=2, eval_batches=1,
                  checkpoint_every=2, out_dir=str(out_dir) if out_dir else None, quiet=True, seed=3, threads=1,
                  weight_decay=0.0)
    return train.TrainConfig(**{**fields, **overrides})


def run_loraplus(out, ratio=16.0, resume_from=None, method="loraplus"):
    model = ml.GPT(ml.GPTConfig(**TINY), seed=1)
    settings = MethodSettings(lora=SMALL_LORA, loraplus_ratio=ratio)
    run = finetune.finetune(model, method, toy_corpus(), config(out), out_dir=out, latency_repeats=0,
                            eval_batches=1, seed=4, settings=settings, resume_from=resume_from)
    return model, run


def comparable(run):
    return {k: v for k, v in dataclasses.asdict(run).items() if k not in ("step_seconds", "latency_ms")}


def test_a_loraplus_fine_tune_saves_its_ratio_and_resumes_exactly(tmp_path, monkeypatch):
    full_model, full = run_loraplus(tmp_path / "full")
    meta = read_lora(tmp_path / "full")[1]
    assert meta["lora_config"]["loraplus_ratio"] == 16.0                      # the adapter records how it trained
    loaded = load_lora(ml.GPT(ml.GPTConfig(**TINY), seed=1), tmp_path / "full")
    assert loaded.lora_config.loraplus_ratio == 16.0
    _, plain = run_loraplus(tmp_path / "plain", method="lora")
    assert plain.train_curve[1:] != full.train_curve[1:]                      # the ratio changes the training

    real_save, calls = train.save_checkpoint, []

    def save_then_crash(*args, **kwargs):
        calls.append(real_save(*args, **kwargs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return calls[-1]

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_loraplus(tmp_path / "part")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    checkpoint = tmp_path / "part" / train.CHECKPOINT_NAME
    meta = train.read_checkpoint(checkpoint)[1]
    assert meta["step"] == 4 and meta["finetune"]["settings"]["loraplus"]["loraplus_ratio"] == 16.0
    assert sorted(meta["lr_ratios"]) == sorted(n for n, _ in full_model.named_parameters() if n.endswith("lora_B"))
    with pytest.raises(ValueError, match=r"settings\.loraplus\.loraplus_ratio=16\.0, this run has .*=4\.0"):
        run_loraplus(tmp_path / "part", ratio=4.0, resume_from=checkpoint)
    resumed_model, resumed = run_loraplus(tmp_path / "part", resume_from=checkpoint)
    assert comparable(resumed) == comparable(full)
    for (name, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert np.array_equal(host(a.data), host(b.data)), name
    saved = [(tmp_path / run / "adapter.safetensors").read_bytes() for run in ("part", "full")]
    assert saved[0] == saved[1]


def test_fit_refuses_to_resume_with_another_ratio(tmp_path):
    ids = toy_corpus().train
    train.fit(lora_model(16.0, dtype="float32"), ids, None, config(tmp_path, steps=2))
    checkpoint = tmp_path / train.CHECKPOINT_NAME
    for ratio, match in ((4.0, r"lr x 16: 4 parameters .*lr x 4: 4 parameters"), (None, r"lr x 16.*all at lr")):
        with pytest.raises(ValueError, match=match):
            train.fit(lora_model(ratio, dtype="float32"), ids, None, config(tmp_path, steps=2), resume_from=checkpoint)


def test_the_command_line_trains_loraplus_and_records_its_ratio(tmp_path, capsys):
    from minilora import cli

    out = tmp_path / "lp"
    args = ["finetune", "--method", "loraplus", "--loraplus-ratio", "4", "--r", "2", "--steps", "2", "--batch-size",
            "2", "--eval-every", "0", "--latency-repeats", "0", "--checkpoint-every", "1", "--out", str(out),
            "--quiet"]
    assert cli.main(args) == 0
    assert "loraplus_ratio=4.0" in capsys.readouterr().out
    assert read_lora(out)[1]["lora_config"]["loraplus_ratio"] == 4.0
    assert train.read_checkpoint(out / train.CHECKPOINT_NAME)[1]["finetune"]["settings"]["loraplus"]["r"] == 2
    assert cli.main(args + ["--resume"]) == 0                  # finished: resumes to the end at once
    assert cli.main([a if a != "4" else "8" for a in args] + ["--resume"]) == 2     # another ratio: refused
    assert "loraplus_ratio=4.0, this run has" in capsys.readouterr().err
