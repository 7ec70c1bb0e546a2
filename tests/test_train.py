"""The training loop: it learns, resumes exactly, stops on non-finite losses; checkpoints; generation."""
import contextlib
import math

import numpy as np
import pytest

import minilora as ml
from minilora import data, tokenizer, train

TINY = dict(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=16)


@contextlib.contextmanager
def crash_after_second_checkpoint():
    """The training run inside is interrupted (KeyboardInterrupt) right after its second checkpoint is written."""
    real_save = train.save_checkpoint
    calls = {"n": 0}

    def save_then_crash(*args, **kwargs):
        path = real_save(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return path

    train.save_checkpoint = save_then_crash
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        train.save_checkpoint = real_save


@pytest.fixture(scope="module")
def toy_ids():
    return tokenizer.encode(data.toy_text("reverse", 400, seed=0))


def _config(tmp_path, **overrides):
    base = dict(steps=12, batch_size=4, warmup_steps=2, eval_every=4, eval_batches=2, checkpoint_every=4,
                out_dir=str(tmp_path), quiet=True, seed=3)
    return train.TrainConfig(**{**base, **overrides})


def test_fit_lowers_the_loss(toy_ids, tmp_path):
    model = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    result = train.fit(model, toy_ids, toy_ids, _config(tmp_path, steps=150, lr=1e-2, min_lr=1e-3, eval_every=50))
    first = np.mean([loss for _, loss in result.train[:10]])
    last = np.mean([loss for _, loss in result.train[-10:]])
    assert last < first - 1.0      # from ~ln(96) = 4.6 at random init towards the task's structure
    assert [step for step, _ in result.val] == [50, 100, 150]
    assert result.val[-1][1] < result.val[0][1]


def _model(cfg, seed, lora_dropout):
    model = ml.GPT(cfg, seed=seed)
    if lora_dropout is not None:     # LoRA layers draw their own dropout masks: their generator must resume too
        ml.apply_lora(model, ml.LoRAConfig(r=2, alpha=4, dropout=lora_dropout))
    return model


@pytest.mark.parametrize("dropout, lora_dropout", [(0.0, None), (0.2, None), (0.1, 0.3)])
def test_resume_reproduces_an_uninterrupted_run_exactly(toy_ids, tmp_path, dropout, lora_dropout):
    if (dropout or lora_dropout) and ml.current_backend() == "cupy":
        pytest.skip("a checkpoint holds NumPy dropout generators' states only: CuPy's have no public state API, "
                    "so on the GPU a resumed run draws other dropout masks")
    cfg = ml.GPTConfig(**TINY, dropout=dropout)
    full_model = _model(cfg, 0, lora_dropout)
    full = train.fit(full_model, toy_ids, toy_ids, _config(tmp_path / "full"))

    # the same run, interrupted after its checkpoint at step 8
    part_cfg = _config(tmp_path / "part")
    stopped = _model(cfg, 0, lora_dropout)
    with crash_after_second_checkpoint():
        train.fit(stopped, toy_ids, toy_ids, part_cfg)
    resumed_model = _model(cfg, 99, lora_dropout)   # different init: everything must come from the checkpoint
    resumed = train.fit(resumed_model, toy_ids, toy_ids, part_cfg,
                        resume_from=tmp_path / "part" / train.CHECKPOINT_NAME)
    assert resumed.train == full.train         # exact, not approximate
    assert resumed.val == full.val
    for (name, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert np.array_equal(a.data, b.data), name


def test_resume_with_a_different_config_is_refused(toy_ids, tmp_path):
    model = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    train.fit(model, toy_ids, None, _config(tmp_path))
    with pytest.raises(ValueError, match="lr"):
        train.fit(model, toy_ids, None, _config(tmp_path, lr=1e-2), resume_from=tmp_path / train.CHECKPOINT_NAME)
    other = ml.GPT(ml.GPTConfig(**{**TINY, "n_embd": 32}), seed=0)
    with pytest.raises(ValueError, match="model config"):
        train.fit(other, toy_ids, None, _config(tmp_path), resume_from=tmp_path / train.CHECKPOINT_NAME)


@pytest.mark.parametrize("threads", [1, 2])
def test_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(toy_ids, tmp_path, monkeypatch, threads):
    from minilora import parallel

    if threads > 1 and ml.current_backend() != "numpy":
        pytest.skip("data-parallel threads are for the CPU: on CuPy ParallelStep runs one")
    model = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    steps = {"n": 0}

    def poisoned(step_function):
        def step(*args, **kwargs):       # called once per training step, from the training loop's thread
            loss = step_function(*args, **kwargs)
            steps["n"] += 1
            return float("nan") if steps["n"] == 7 else loss
        return step

    monkeypatch.setattr(train, "forward_backward", poisoned(train.forward_backward))
    monkeypatch.setattr(parallel.ParallelStep, "forward_backward", poisoned(parallel.ParallelStep.forward_backward))
    with pytest.raises(FloatingPointError, match="step 7"):
        train.fit(model, toy_ids, None, _config(tmp_path, eval_every=0, threads=threads))
    path = tmp_path / train.CHECKPOINT_NAME
    restored, meta = train.load_checkpoint(path)
    assert meta["step"] == 4
    assert all(math.isfinite(loss) for _, loss in meta["history"]["train"])
    assert len(meta["history"]["train"]) == 4


def test_non_finite_gradient_stops_training_before_the_update(toy_ids, tmp_path, monkeypatch):
    model = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    real = train.clip_grad_norm
    calls = {"n": 0}

    def overflowing(params, max_norm):
        calls["n"] += 1
        return float("inf") if calls["n"] == 6 else real(params, max_norm)

    monkeypatch.setattr(train, "clip_grad_norm", overflowing)
    with pytest.raises(FloatingPointError, match="gradient norm became inf at step 6"):
        train.fit(model, toy_ids, None, _config(tmp_path, eval_every=0))
    _, meta = train.load_checkpoint(tmp_path / train.CHECKPOINT_NAME)
    assert meta["step"] == 4


def _last_token_batches(ids, batch_size, block_size):
    """A batch function as a classification task has: targets at the last position only, IGNORE elsewhere."""
    def draw(rng):
        idx, targets = data.get_batch(ids, batch_size, block_size, rng)
        targets = targets.copy()           # a view of the same windows as idx
        targets[:, :-1] = -1
        return idx, targets
    return draw


@pytest.mark.parametrize("threads", [1, 2])
def test_fit_draws_batches_from_a_function_and_ignores_what_it_is_told(toy_ids, tmp_path, threads):
    model = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    scores = []

    def validate(m):
        scores.append(m.training)
        return float(len(scores))

    config = _config(tmp_path, threads=threads, out_dir=None)
    result = train.fit(model, config=config, batches=_last_token_batches(toy_ids, 4, 16), ignore_index=-1,
                       validate=validate)
    assert result.val == [[4, 1.0], [8, 2.0], [12, 3.0]] and scores == [False] * 3    # scored in evaluation mode
    assert model.training and all(p.grad is None for p in model.parameters())
    assert result.tokens_per_second > 0

    # the same steps by hand: each loss is the mean over the last positions only
    by_hand = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    optimizer = ml.AdamW(by_hand.parameters(), lr=config.lr, betas=(config.beta1, config.beta2),
                         weight_decay=config.weight_decay)
    draw, rng = _last_token_batches(toy_ids, 4, 16), np.random.default_rng(config.seed)
    for step, (_, loss) in enumerate(result.train):
        optimizer.lr = ml.cosine_schedule(step, config.lr, config.warmup_steps, config.steps, config.min_lr)
        idx, targets = draw(rng)
        expected = train.forward_backward(by_hand, idx, targets, ignore_index=-1)
        assert loss == pytest.approx(expected, rel=1e-5), step
        ml.clip_grad_norm(by_hand.parameters(), config.grad_clip)
        optimizer.step()
        by_hand.zero_grad()


def test_a_run_on_a_batch_function_resumes_exactly(toy_ids, tmp_path):
    batches = _last_token_batches(toy_ids, 4, 16)
    full = train.fit(ml.GPT(ml.GPTConfig(**TINY), seed=0), config=_config(tmp_path / "full"), batches=batches,
                     ignore_index=-1)
    part_cfg = _config(tmp_path / "part", steps=12)
    stopped = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    with crash_after_second_checkpoint():
        train.fit(stopped, config=part_cfg, batches=batches, ignore_index=-1)
    resumed = train.fit(ml.GPT(ml.GPTConfig(**TINY), seed=9), config=part_cfg, batches=batches, ignore_index=-1,
                        resume_from=tmp_path / "part" / train.CHECKPOINT_NAME)
    assert resumed.train == full.train


def test_fit_needs_one_source_of_batches_and_of_validation(toy_ids, tmp_path):
    model = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    config = _config(tmp_path)
    with pytest.raises(ValueError, match="exactly one source of training batches"):
        train.fit(model, config=config)
    with pytest.raises(ValueError, match="exactly one source of training batches"):
        train.fit(model, toy_ids, config=config, batches=_last_token_batches(toy_ids, 4, 16))
    with pytest.raises(ValueError, match="not both"):
        train.fit(model, toy_ids, toy_ids, config, validate=lambda m: 0.0)
    with pytest.raises(TypeError, match="batches must be a function; got int"):
        train.fit(model, config=config, batches=5)
    with pytest.raises(TypeError, match="validate must be a function"):
        train.fit(model, toy_ids, config=config, validate="loss")


def test_the_fine_tuning_config():
    config = train.TrainConfig.for_finetuning(5, 8, 1e-2, block_size=64, seed=3)
    assert (config.steps, config.batch_size, config.lr, config.min_lr) == (5, 8, 1e-2, 1e-3)
    assert (config.warmup_steps, config.weight_decay, config.checkpoint_every) == (5, 0.0, 0)
    assert (config.block_size, config.seed) == (64, 3)
    assert train.TrainConfig.for_finetuning(300, 8, 1e-3, weight_decay=0.1).warmup_steps == 20


def test_checkpoint_round_trip_and_damage(tmp_path):
    model = ml.GPT(ml.GPTConfig(**TINY), seed=5)
    opt = ml.AdamW(model.parameters())
    path = train.save_checkpoint(tmp_path / "c.safetensors", model, opt, {"step": 3})
    loaded, meta = train.load_checkpoint(path)
    assert meta["step"] == 3 and meta["model_config"] == model.config.to_dict()
    for (_, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert np.array_equal(a.data, b.data)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        train.load_checkpoint(tmp_path / "cut.safetensors")
    ml.files.save_safetensors({"x": np.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not a minilora checkpoint"):
        train.load_checkpoint(tmp_path / "plain.safetensors")


def test_evaluate_is_the_mean_token_loss_and_restores_the_mode(toy_ids):
    model = ml.GPT(ml.GPTConfig(**TINY, dropout=0.3), seed=0).train()
    loss = train.evaluate(model, toy_ids, batch_size=8, max_batches=3)
    assert model.training
    batches = list(data.sequential_batches(toy_ids, 8, 16, 3))
    model.eval()
    expected = [ml.cross_entropy(model.forward(i), t)[0] * t.size for i, t in batches]
    assert loss == pytest.approx(sum(expected) / sum(t.size for _, t in batches), rel=1e-12)


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        train.TrainConfig(steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        train.TrainConfig(steps=5, warmup_steps=10)
    with pytest.raises(ValueError, match="min_lr"):
        train.TrainConfig(lr=1e-3, min_lr=1e-2)


# ----------------------------------------------------------------------------------------------------
# generation


def test_generate_shapes_determinism_and_greedy():
    model = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    prompt = np.array([[5, 6, 7], [8, 9, 10]])
    a = model.generate(prompt, 30, temperature=1.0, seed=1)
    assert a.shape == (2, 33) and np.array_equal(a[:, :3], prompt)
    assert np.array_equal(a, model.generate(prompt, 30, temperature=1.0, seed=1))
    assert not np.array_equal(a, model.generate(prompt, 30, temperature=1.0, seed=2))
    greedy = model.generate(prompt, 5, temperature=0)
    assert np.array_equal(greedy, model.generate(prompt, 5, temperature=0.7, top_k=1, seed=4))
    logits = model.forward(prompt)
    assert np.array_equal(greedy[:, 3], ml.backend.to_numpy(logits[:, -1].argmax(axis=1)))
    assert a.max() < 96 and a.min() >= 0           # context longer than block_size (33 > 16) was cropped


def test_top_k_only_samples_among_the_k_most_likely():
    model = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    prompt = np.array([[5, 6, 7]] * 64)
    out = model.generate(prompt, 1, temperature=2.0, top_k=3, seed=0)
    allowed = set(np.argsort(model.forward(prompt[:1])[0, -1])[-3:].tolist())
    assert set(out[:, -1].tolist()) <= allowed and len(set(out[:, -1].tolist())) > 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=2, top_k=0), "top_k"),
    (dict(max_new_tokens=2, top_k=97), "top_k"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    model = ml.GPT(ml.GPTConfig(**TINY), seed=0)
    with pytest.raises(ValueError, match=match):
        model.generate(np.array([[1, 2]]), **kwargs)
