"""The fine-tuning methods other than LoRA (adapters, prefix, prompt, BitFit) and their combinations:
gradient checks, starting points, freezing, errors, memory and checkpoints, the classification task. (Each
method against PyTorch autograd: test_methods_torch.py; the comparison of the methods:
test_experiment_compare.py.)"""
import numpy as np
import pytest

import minilora as ml
from minilora.core.vera import VeRAConfig
from minilora import gradcheck as gc
from minilora.adapters import AdapterConfig, adapter_modules, adapter_parameter_count, apply_adapters
from minilora.lora import LoRAConfig, apply_lora, lora_modules
from minilora.methods import METHODS, MethodSettings, apply_method, for_inference, method_state, training_memory
from minilora.prefix import (
    PrefixConfig,
    PromptConfig,
    apply_prefix,
    apply_prompt,
    bake_prefix,
    virtual_tokens,
)
from minilora.tasks import IGNORE, accuracy, classification_batch, load_task, train_classifier
from minilora.train import TrainConfig, fit

CFG = dict(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=8)
SMALL = MethodSettings(lora=LoRAConfig(r=2, alpha=4.0), adapters=AdapterConfig(bottleneck=3),
                       prefix=PrefixConfig(length=3), prefix_mlp=PrefixConfig(length=3, reparameterize=True, hidden=5),
                       prompt=PromptConfig(length=3), vera=VeRAConfig(r=4))


def small_model(dtype="float64", seed=0):
    return ml.GPT(ml.GPTConfig(**CFG), seed=seed, dtype=dtype)


def tokens(B=2, T=6, seed=0):
    return np.random.default_rng(seed).integers(0, CFG["vocab_size"], size=(B, T))


# ----------------------------------------------------------------------------------------------------
# gradient checks (finite differences, float64)


def test_every_new_layer_passes_its_gradient_check():
    results = gc.method_layer_checks()
    failed = [f"{r.layer} {r.param}: {r.rel_error:.2e}" for r in results if not r.passed]
    assert not failed, failed
    names = " ".join(r.layer for r in results)
    for layer in ("adapter", "prefix attention", "prefix MLP", "lora"):
        assert layer in names
    assert max(r.rel_error for r in results) <= gc.THRESHOLD


def test_every_method_passes_a_whole_model_directional_check_with_dropout():
    results = gc.method_model_checks()
    assert [r.layer for r in results] == [f"GPT + {m}" for m in METHODS]
    failed = [f"{r.layer}: {r.rel_error:.2e}" for r in results if not r.passed]
    assert not failed, failed


# ----------------------------------------------------------------------------------------------------
# where each method starts


@pytest.mark.parametrize("method", ["full", "bitfit", "adapters", "lora", "lora+adapters", "vera"])
def test_methods_without_virtual_tokens_start_exactly_at_the_base_model(method):
    idx = tokens()
    expected = small_model().forward(idx)
    model = apply_method(small_model(), method, SMALL)
    assert np.array_equal(model.forward(idx), expected)


@pytest.mark.parametrize("apply", [lambda m: apply_prefix(m, PrefixConfig(length=0)),
                                   lambda m: apply_prefix(m, PrefixConfig(length=0, reparameterize=True)),
                                   lambda m: apply_prompt(m, PromptConfig(length=0))])
def test_zero_virtual_tokens_is_exactly_the_base_model(apply):
    idx = tokens(T=CFG["block_size"])
    expected = small_model().forward(idx)
    model = apply(small_model())
    assert np.array_equal(model.forward(idx), expected)


def test_virtual_tokens_take_the_first_positions():
    """With prompt tuning, the real tokens sit at positions P..P+T-1: feeding the prompt vectors' own tokens
    as a prompt gives the same logits as those tokens typed in front of the sequence."""
    idx = tokens(B=1, T=5)
    prompt_ids = np.array([[4, 7, 1]])
    base = small_model()
    expected = base.forward(np.concatenate([prompt_ids, idx], axis=1))[:, 3:]
    model = apply_prompt(small_model(), PromptConfig(length=3, init="random"))
    model.wte.prompt_embeddings.data[...] = model.wte.weight.data[prompt_ids[0]]
    assert gc.rel_error(model.forward(idx), expected) < 1e-12


def test_a_prefix_made_of_real_token_activations_equals_those_tokens_in_the_context():
    """The "vocab" initialisation copies the keys and values of P real tokens, so at the start prefix tuning
    computes exactly what the base model computes with those tokens in front (under causal attention the
    tokens' own keys and values do not depend on what follows them)."""
    model = small_model()
    seed = 3
    apply_prefix(model, PrefixConfig(length=4, init="vocab"), seed=seed)
    prefix_ids = np.random.default_rng(seed).integers(0, CFG["vocab_size"], size=4)    # what apply_prefix drew
    idx = tokens(B=2, T=5)
    expected = small_model().forward(np.concatenate([np.tile(prefix_ids, (2, 1)), idx], axis=1))[:, 4:]
    assert gc.rel_error(model.forward(idx), expected) < 1e-12


def test_baking_the_prefix_mlp_keeps_the_outputs_and_drops_the_mlp():
    model = apply_prefix(small_model(), PrefixConfig(length=3, reparameterize=True, hidden=5))
    gc.randomize_parameters(model, seed=1)
    idx = tokens()
    before = model.forward(idx)
    bake_prefix(model)
    assert "prefix_encoder" not in vars(model)
    assert np.array_equal(model.forward(idx), before)
    assert sorted(n for n, _ in model.named_parameters(trainable_only=True)) == sorted(
        f"h.{i}.attn.prefix_{kind}" for i in range(2) for kind in ("keys", "values"))
    with pytest.raises(ValueError, match="no prefix MLP"):
        bake_prefix(model)


def test_merging_lora_for_inference_keeps_the_outputs():
    model = apply_method(small_model(), "lora+adapters", SMALL)
    gc.randomize_parameters(model, seed=2)
    idx = tokens()
    before = model.forward(idx)
    for_inference(model, "lora+adapters")
    assert all(m.merged for _, m in lora_modules(model))
    assert gc.rel_error(model.forward(idx), before) < 1e-12


# ----------------------------------------------------------------------------------------------------
# what trains, what stays frozen


EXPECTED_TRAINABLE = {
    "bitfit": lambda n: n.endswith(".bias"),
    "adapters": lambda n: ".adapter_" in n,
    "prefix": lambda n: ".prefix_" in n,
    "prefix-mlp": lambda n: n.startswith("prefix_encoder."),
    "prompt": lambda n: n == "wte.prompt_embeddings",
    "lora": lambda n: ".lora_" in n,
    "lora+adapters": lambda n: ".lora_" in n or ".adapter_" in n,
    "lora+prefix": lambda n: ".lora_" in n or ".prefix_" in n,
    "loraplus": lambda n: ".lora_" in n,
    "dora": lambda n: ".lora_" in n,               # lora_A, lora_B and lora_magnitude
    "vera": lambda n: ".vera_lambda_" in n,          # not the shared random pair vera_A, vera_B
    "qlora": lambda n: ".lora_" in n,               # on the 4-bit base, whose weights are codes, not Parameters
}


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_exactly_the_trainable_parameters(method):
    model = apply_method(small_model(dtype="float32"), method, SMALL)
    is_trainable = EXPECTED_TRAINABLE.get(method, lambda n: True)
    params = dict(model.named_parameters())
    assert {n for n, p in params.items() if p.trainable} == {n for n in params if is_trainable(n)}
    before = {n: p.data.copy() for n, p in params.items()}
    ids = np.random.default_rng(0).integers(0, CFG["vocab_size"], size=400).astype(np.uint8)
    fit(model, ids, None, TrainConfig(steps=3, batch_size=2, block_size=6, lr=1e-2, min_lr=1e-3, warmup_steps=0,
                                      eval_every=0, checkpoint_every=0, quiet=True))
    for n, p in params.items():
        if p.trainable:
            assert not np.array_equal(p.data, before[n]), f"{method}: {n} did not train"
        else:
            assert np.array_equal(p.data, before[n]), f"{method}: frozen {n} changed"


def test_methods_keep_the_base_parameter_names():
    base_names = [n for n, _ in small_model().named_parameters()]
    for method in METHODS:
        model = apply_method(small_model(), method, SMALL)
        names = [n for n, _ in model.named_parameters()]
        # QLoRA keeps the linear layers' weights as 4-bit codes (packed_weights) under their names, not as Parameters
        packed = {f"{name}.{k}" for name, m in model.named_modules() for k in m.packed_weights()}
        assert not packed or method == "qlora", method
        assert [n for n in names if n in base_names] == [n for n in base_names if n not in packed], method


def test_methods_combine_in_either_order():
    a = apply_lora(apply_prefix(small_model(), PrefixConfig(length=2)), LoRAConfig(r=2))
    b = apply_prefix(apply_lora(small_model(), LoRAConfig(r=2)), PrefixConfig(length=2))
    for model in (a, b):
        trainable = [n for n, _ in model.named_parameters(trainable_only=True)]
        assert sum(".lora_" in n for n in trainable) == 8 and sum(".prefix_" in n for n in trainable) == 4
    c = apply_lora(apply_adapters(small_model(), AdapterConfig(bottleneck=2)), LoRAConfig(r=2, targets=("o_proj",)))
    assert len(adapter_modules(c)) == 4 and len(lora_modules(c)) == 2
    assert all(p.trainable for n, p in c.named_parameters() if ".adapter_" in n)


def test_parameter_counts():
    model = ml.GPT(ml.GPTConfig(), seed=0)
    counts = {m: apply_method(ml.GPT(ml.GPTConfig(), seed=0), m).num_parameters(trainable_only=True) for m in METHODS}
    assert counts["full"] == model.num_parameters()
    assert counts["lora"] == 4 * (128 + 128) * 2 * 4 == 8192
    assert counts["adapters"] == adapter_parameter_count(AdapterConfig(), 4, 128) == 8 * (2 * 128 * 4 + 4 + 128)
    assert counts["prefix"] == 2 * 4 * 8 * 128
    assert counts["prompt"] == 8 * 128
    assert counts["bitfit"] == 4 * (4 * 128 + 512 + 128 + 2 * 128) + 128
    assert counts["lora+adapters"] == counts["lora"] + counts["adapters"]
    assert counts["lora+prefix"] == counts["lora"] + counts["prefix"]
    assert counts["vera"] == 8 * (256 + 128) == 3072                # r + out per adapted layer


# ----------------------------------------------------------------------------------------------------
# bad settings


def test_bad_settings_give_clear_errors():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="bottleneck"):
            AdapterConfig(bottleneck=bad)
    with pytest.raises(ValueError, match="places"):
        AdapterConfig(places=("attn", "ffn"))
    with pytest.raises(ValueError, match="exceeds n_embd"):
        apply_adapters(small_model(), AdapterConfig(bottleneck=9))
    with pytest.raises(ValueError, match="length"):
        PrefixConfig(length=-1)
    with pytest.raises(ValueError, match="init"):
        PromptConfig(init="text")
    with pytest.raises(ValueError, match="block_size is 12"):
        apply_prefix(small_model(), PrefixConfig(length=12))
    with pytest.raises(ValueError, match="block_size is 12"):
        apply_prompt(small_model(), PromptConfig(length=20))
    with pytest.raises(ValueError, match="unknown fine-tuning method 'lora2'"):
        apply_method(small_model(), "lora2")
    with pytest.raises(TypeError, match="AdapterConfig"):
        apply_adapters(small_model(), LoRAConfig())


def test_sequences_that_no_longer_fit_are_refused_before_any_state_changes():
    model = apply_prefix(small_model(), PrefixConfig(length=3))
    assert virtual_tokens(model) == 3
    model.forward(tokens(T=9))                        # 9 + 3 = 12 = block_size: fits
    with pytest.raises(ValueError, match=r"sequence length 10 plus 3 virtual tokens .* at most 9 tokens"):
        model.forward(tokens(T=10))
    with pytest.raises(ValueError, match="already has virtual tokens"):
        apply_prompt(model, PromptConfig(length=2))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(apply_adapters(small_model()), AdapterConfig())


# ----------------------------------------------------------------------------------------------------
# memory and checkpoints


def test_training_memory_and_checkpoint_contents():
    idx = tokens(T=8)
    memories, states = {}, {}
    for method in METHODS:
        model = apply_method(small_model(dtype="float32"), method, SMALL)
        memories[method] = training_memory(model, idx, idx)
        assert all(p.grad is None for p in model.parameters()), "training_memory must leave no gradient behind"
        states[method] = method_state(model, method)
    assert memories["full"]["gradients"] == memories["full"]["parameters"]
    assert memories["full"]["optimizer"] == 2 * memories["full"]["parameters"]
    for method in METHODS[1:]:
        m = memories[method]
        assert 0 < m["gradients"] < memories["full"]["gradients"] / 4, method
        assert m["activations"] > 0 and m["total"] == sum(v for k, v in m.items() if k != "total")
    assert len(states["full"]) == len(dict(small_model().named_parameters()))
    assert sorted(states["prefix-mlp"]) == sorted(states["prefix"])          # baked: the prefixes, not the MLP
    assert all(".lora_" in k for k in states["lora"])
    assert sorted(states["prompt"]) == ["wte.prompt_embeddings"]


# ----------------------------------------------------------------------------------------------------
# the classification task


def test_classification_task_is_balanced_and_labelled_with_label_tokens():
    task = load_task(length=31, val_per_class=5)
    assert task.classes == ("pydoc", "email", "tkinter", "asyncio")
    assert load_task("stdlib-package", length=31, val_per_class=1).classes == ("asyncio", "email", "tkinter", "xml")
    assert task.val_x.shape == (20, 31) and np.bincount(task.val_y).tolist() == [5, 5, 5, 5]
    assert ml.tokenizer.decode(task.label_ids) == "0123"
    idx, targets = classification_batch(task, 6, np.random.default_rng(0))
    assert idx.shape == targets.shape == (6, 31)
    assert all(len(set(row.tolist())) == 1 and row[0] in task.label_ids for row in targets)
    _, last_only = classification_batch(task, 6, np.random.default_rng(0), every_position=False)
    assert (last_only[:, :-1] == IGNORE).all() and np.array_equal(last_only[:, -1], targets[:, -1])
    with pytest.raises(ValueError, match="unknown classification task"):
        load_task("sentiment")


def test_a_classifier_trains_and_is_scored():
    task = load_task(length=15, val_per_class=3)
    model = apply_method(ml.GPT(ml.GPTConfig(block_size=32, n_layer=1, n_embd=16, n_head=2), seed=0), "lora",
                         MethodSettings(lora=LoRAConfig(r=2)))
    run = train_classifier(model, task, steps=4, batch_size=4, lr=1e-2)
    assert len(run.losses) == 4 and all(np.isfinite(run.losses)) and run.step_seconds > 0
    assert 0.0 <= accuracy(model, task) <= 1.0


def test_classifier_training_is_the_training_loop_with_the_tasks_batches(monkeypatch):
    from minilora import tasks, train

    task = load_task(length=15, val_per_class=3)

    def fresh():
        return apply_method(ml.GPT(ml.GPTConfig(block_size=32, n_layer=1, n_embd=16, n_head=2), seed=0), "lora",
                            MethodSettings(lora=LoRAConfig(r=2)))

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return fit(*args, **kwargs)

    monkeypatch.setattr(tasks, "fit", spy)
    run = train_classifier(fresh(), task, steps=4, batch_size=4, lr=1e-2, seed=2)
    assert len(calls) == 1 and calls[0]["ignore_index"] == IGNORE
    direct = fit(fresh(), config=tasks.classifier_config(4, 4, 1e-2, seed=2), batches=tasks.task_batches(task, 4),
                 ignore_index=IGNORE)
    assert run.losses == [loss for _, loss in direct.train]      # the same loop, the same numbers

    # a non-finite loss stops it as it stops any run, and the loop cleans up after itself
    model = fresh()
    monkeypatch.setattr(train, "forward_backward", lambda *args, **kwargs: float("nan"))
    monkeypatch.setattr(ml.parallel.ParallelStep, "forward_backward", lambda *args, **kwargs: float("nan"))
    with pytest.raises(FloatingPointError, match="step 1"):
        train_classifier(model, task, steps=4, batch_size=4, lr=1e-2)
    assert all(p.grad is None for p in model.parameters())


def test_the_fine_tune_recipe_on_a_classification_task():
    from minilora import finetune, tasks

    task = load_task(length=15, val_per_class=3)
    model = ml.GPT(ml.GPTConfig(block_size=32, n_layer=1, n_embd=16, n_head=2), seed=0)
    run = finetune.finetune(model, "prompt", task, tasks.classifier_config(4, 4, 1e-2, eval_every=2),
                            settings=MethodSettings(prompt=PromptConfig(length=3)), latency_repeats=1)
    assert run.metric == "accuracy" and [s for s, _ in run.val_curve] == [0, 2, 4]
    assert all(0.0 <= acc <= 1.0 for _, acc in run.val_curve) and run.val_curve[-1][1] == run.val_after
    assert run.val_before == accuracy(ml.GPT(ml.GPTConfig(block_size=32, n_layer=1, n_embd=16, n_head=2), seed=0),
                                      task)
    assert run.trainable == 3 * 16 and len(run.train_curve) == 4
    assert set(run.latency_ms["1"]) == {"base", "unmerged", "merged", "ratio", "verdict", "rounds", "iqr_ms"}
    assert set(run.latency_ms["1"]["ratio"]) == {"unmerged", "merged"}


@pytest.mark.parametrize("method", ["prefix", "prompt", "adapters"])
def test_generation_crops_the_context_to_what_fits(method):
    model = apply_method(small_model(dtype="float32"), method, SMALL)
    out = model.generate(tokens(B=1, T=9), max_new_tokens=6, seed=0)    # 15 tokens > block_size - 3
    assert out.shape == (1, 15)


def test_what_a_method_added_is_an_explicit_field_of_its_parameters():
    """freeze_pretrained freezes what no method added, by the parameter's added_by field, not by its name."""
    for method in METHODS:
        model = apply_method(small_model(), method, SMALL)
        for name, p in model.named_parameters():
            if method == "full":
                assert p.added_by is None and p.trainable, name
            elif p.added_by is not None:
                frozen_by_design = name in ("vera_A", "vera_B")     # VeRA's shared random pair never trains
                assert p.added_by in method.replace("-mlp", "") and p.trainable != frozen_by_design, \
                    (method, name, p.added_by)
            elif method != "bitfit":
                assert not p.trainable, (method, name)
