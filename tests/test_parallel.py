"""Data parallelism over threads gives the gradient of the whole batch (parallel.py)."""
import numpy as np
import pytest

import minilora as ml
from minilora.gradcheck import randomize_parameters
from minilora.methods import METHODS, MethodSettings, apply_method
from minilora.parallel import ParallelStep, default_threads
from minilora.train import TrainConfig, fit

CFG = dict(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=8)


def assert_same_gradients(grads1, grads2):
    """Equal up to rounding, measured against the largest gradient of the model (attn.k_proj.bias has a true
    gradient of exactly zero, a softmax is blind to a shift, so its own scale is rounding noise)."""
    assert grads1.keys() == grads2.keys() and grads1
    scale = max(float(np.abs(g).max()) for g in grads1.values())
    for name in grads1:
        assert float(np.abs(grads1[name] - grads2[name]).max()) <= 1e-12 * scale, name


def grads_and_loss(model, idx, targets, threads, ignore_index=None, slice_tokens="auto"):
    step = ParallelStep(model, threads, slice_tokens)
    loss = step.forward_backward(idx, targets, ignore_index)
    step.close()
    grads = {n: p.grad.copy() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss, grads


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("threads", [2, 3])
def test_split_batches_give_the_whole_batch_gradient(method, threads):
    settings = MethodSettings(lora=ml.LoRAConfig(r=2), adapters=ml.AdapterConfig(bottleneck=2),
                              prefix=ml.PrefixConfig(length=2), prefix_mlp=ml.PrefixConfig(length=2, reparameterize=True),
                              prompt=ml.PromptConfig(length=2))
    model = apply_method(ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64"), method, settings)
    randomize_parameters(model, seed=1)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 13, size=(5, 7))
    targets = rng.integers(0, 13, size=(5, 7))
    loss1, grads1 = grads_and_loss(model, idx, targets, 1)
    loss2, grads2 = grads_and_loss(model, idx, targets, threads)
    assert abs(loss1 - loss2) <= 1e-12 * abs(loss1)
    assert_same_gradients(grads1, grads2)


def test_uneven_ignored_targets_and_tiny_batches():
    model = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
    randomize_parameters(model, seed=2)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 13, size=(4, 6))
    targets = rng.integers(0, 13, size=(4, 6))
    targets[:2, :5] = -1                         # the first slice counts far fewer tokens than the second
    loss1, grads1 = grads_and_loss(model, idx, targets, 1, ignore_index=-1)
    loss2, grads2 = grads_and_loss(model, idx, targets, 2, ignore_index=-1)
    assert abs(loss1 - loss2) < 1e-12
    assert_same_gradients(grads1, grads2)
    loss3, grads3 = grads_and_loss(model, idx[:1], targets[:1] * 0, 4)    # more threads than sequences
    loss4, grads4 = grads_and_loss(model, idx[:1], targets[:1] * 0, 1)
    assert abs(loss3 - loss4) < 1e-12
    assert_same_gradients(grads3, grads4)


@pytest.mark.parametrize("threads", [1, 2])
def test_cache_sized_slices_give_the_whole_batch_gradient(threads):
    model = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
    randomize_parameters(model, seed=3)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 13, size=(6, 7))
    targets = rng.integers(0, 13, size=(6, 7))
    loss1, grads1 = grads_and_loss(model, idx, targets, 1, slice_tokens=None)
    loss2, grads2 = grads_and_loss(model, idx, targets, threads, slice_tokens=10)    # 5 slices of 1-2 sequences
    assert abs(loss1 - loss2) < 1e-12
    assert_same_gradients(grads1, grads2)


def test_training_with_threads_is_reproducible_with_dropout():
    ids = np.random.default_rng(0).integers(0, 13, size=500).astype(np.uint8)
    runs = []
    for _ in range(2):
        model = ml.GPT(ml.GPTConfig(**{**CFG, "dropout": 0.2}), seed=0)
        result = fit(model, ids, None, TrainConfig(steps=4, batch_size=4, block_size=8, warmup_steps=0, eval_every=0,
                                                   checkpoint_every=0, quiet=True, threads=2))
        runs.append([loss for _, loss in result.train])
    assert runs[0] == runs[1]


def test_threads_change_only_rounding_without_dropout():
    ids = np.random.default_rng(0).integers(0, 13, size=500).astype(np.uint8)
    losses = {}
    for threads in (1, 2):
        model = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
        result = fit(model, ids, None, TrainConfig(steps=4, batch_size=4, block_size=8, warmup_steps=0, eval_every=0,
                                                   checkpoint_every=0, quiet=True, threads=threads))
        losses[threads] = np.array([loss for _, loss in result.train])
    assert np.allclose(losses[1], losses[2], rtol=1e-12, atol=0)


def test_bad_thread_counts():
    model = ml.GPT(ml.GPTConfig(**CFG), seed=0)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            ParallelStep(model, bad)
        with pytest.raises(ValueError, match="threads"):
            TrainConfig(threads=bad)
        with pytest.raises(ValueError, match="slice_tokens"):
            ParallelStep(model, 1, bad)
    assert 1 <= default_threads(8) <= 8 and default_threads(1) == 1


# ----------------------------------------------------------------------------------------------------
# how many CPUs the process may use


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu.max": "garbage\n"}, None),
    ({}, None),
])
def test_the_cgroup_quota_is_read_from_v2_or_v1_files(tmp_path, files, expected):
    from minilora.fast.parallel import _cgroup_cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_cpu_quota(str(tmp_path)) == expected


def test_usable_cpus_follow_the_affinity_mask_and_the_quota(tmp_path, monkeypatch):
    import os

    from minilora.fast import parallel

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert parallel.usable_cpus(str(tmp_path)) == 4                     # the mask, not the host's 64
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert parallel.usable_cpus(str(tmp_path)) == 1                     # 1.5 CPUs of quota: one thread
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert parallel.usable_cpus(str(tmp_path)) == 1                     # never 0
    monkeypatch.setattr(parallel, "usable_cpus", lambda *a: 3)
    assert parallel.default_threads(batch_size=8) == 3 and parallel.default_threads(batch_size=2) == 2


def test_evaluation_runs_blas_on_one_thread(monkeypatch):
    from threadpoolctl import threadpool_info

    import minilora as ml
    from minilora import train

    seen = []
    model = ml.GPT(ml.GPTConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0)
    forward = model.forward

    def spy(idx):
        seen.extend(i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas")
        return forward(idx)

    monkeypatch.setattr(model, "forward", spy)
    before = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
    train.evaluate(model, np.arange(200) % 96, batch_size=2, block_size=16, max_batches=2)
    assert seen and set(seen) == {1}
    assert [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"] == before
