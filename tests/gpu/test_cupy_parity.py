"""CuPy against NumPy: the same computations on the GPU give the same numbers (run by tests/gpu/check.sh).

Skipped without CuPy and a CUDA GPU. Every check builds the arrays on the host, runs once on each backend
and compares on the host, so nothing here depends on which backend the rest of the session uses.
"""
import numpy as np
import pytest

cupy = pytest.importorskip("cupy", reason="the GPU tests need CuPy (pip install 'minilora[gpu]')")

import minilora as ml  # noqa: E402
from minilora import backend  # noqa: E402
from minilora import gradcheck as gc  # noqa: E402
from minilora.methods import METHODS, MethodSettings, apply_method  # noqa: E402

try:
    backend.use_backend("cupy")
    backend.use_backend("numpy")
except ValueError as exc:                                   # CuPy installed but no usable GPU
    pytest.skip(f"no usable GPU: {exc}", allow_module_level=True)

CFG = dict(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16)
SMALL = MethodSettings(lora=ml.LoRAConfig(r=2, alpha=4.0), adapters=ml.AdapterConfig(bottleneck=3),
                       prefix=ml.PrefixConfig(length=3), prefix_mlp=ml.PrefixConfig(length=3, reparameterize=True),
                       prompt=ml.PromptConfig(length=3))


def on(name, fn):
    """Run fn() with backend ``name`` selected; return its result with every array moved to the host."""
    with backend.backend(name):
        out = fn()
    if isinstance(out, dict):
        return {k: backend.to_numpy(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(backend.to_numpy(v) if backend.is_array(v) else v for v in out)
    return backend.to_numpy(out) if backend.is_array(out) else out


def test_every_layer_passes_its_gradient_check_on_the_gpu():
    def checks():
        results = gc.layer_checks() + gc.method_layer_checks()
        assert all(type(r.rel_error) is float for r in results)
        return results

    with backend.backend("cupy"):
        results = checks()
    failed = [f"{r.layer} {r.param}: {r.rel_error:.2e}" for r in results if not r.passed]
    assert not failed, failed


def test_whole_model_directional_checks_on_the_gpu():
    with backend.backend("cupy"):
        results = gc.model_checks() + gc.method_model_checks()
    failed = [f"{r.layer} {r.param}: {r.rel_error:.2e}" for r in results if not r.passed]
    assert not failed, failed


@pytest.mark.parametrize("method", (None,) + METHODS)
def test_forward_and_gradients_match_numpy(method):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, CFG["vocab_size"], size=(3, 9))
    targets = rng.integers(0, CFG["vocab_size"], size=(3, 9))

    def run():
        model = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
        if method is not None:
            apply_method(model, method, SMALL, seed=0)
        gc.randomize_parameters(model, seed=1)               # host-drawn noise: identical on both backends
        logits = model.forward(backend.asarray(idx))
        loss, dlogits = ml.cross_entropy(logits, backend.asarray(targets))
        model.backward(dlogits)
        out = {"logits": logits, "loss": backend.xp().asarray(loss)}
        out.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        return out

    cpu, gpu = on("numpy", run), on("cupy", run)
    assert cpu.keys() == gpu.keys()
    scale = max(float(np.abs(v).max()) for k, v in cpu.items() if k not in ("logits", "loss"))
    for key in cpu:
        ref = max(scale, float(np.abs(cpu[key]).max())) if key not in ("logits", "loss") else float(np.abs(cpu[key]).max())
        assert float(np.abs(cpu[key] - gpu[key]).max()) <= 1e-10 * ref, key


def test_training_matches_numpy_in_float32():
    ids = np.random.default_rng(0).integers(0, CFG["vocab_size"], size=2000).astype(np.uint8)

    def run():
        model = ml.GPT(ml.GPTConfig(**CFG), seed=0)
        result = ml.train.fit(model, ids, None, ml.train.TrainConfig(steps=5, batch_size=4, block_size=16,
                                                                     warmup_steps=0, eval_every=0, quiet=True))
        return np.array([loss for _, loss in result.train])

    cpu, gpu = on("numpy", run), on("cupy", run)
    assert np.allclose(cpu, gpu, rtol=1e-4), (cpu, gpu)


def test_lora_merge_files_and_generation_on_the_gpu(tmp_path):
    with backend.backend("cupy"):
        model = ml.GPT(ml.GPTConfig(**CFG), seed=0)
        ml.apply_lora(model, ml.LoRAConfig(r=2))
        gc.randomize_parameters(model, seed=2)
        idx = backend.asarray(np.arange(8).reshape(1, 8))
        before = backend.to_numpy(model.forward(idx))
        ml.merge_lora(model)
        assert np.allclose(backend.to_numpy(model.forward(idx)), before, atol=1e-5)
        ml.unmerge_lora(model)
        ml.save_lora(model, tmp_path / "adapter")
        ml.interop.save_hf_gpt2(model, tmp_path / "gpt")
        out = model.generate(np.arange(4).reshape(1, 4), max_new_tokens=5, seed=0)
        assert isinstance(out, np.ndarray) and out.shape == (1, 9)
    with backend.backend("numpy"):
        base = ml.interop.load_hf_gpt2(tmp_path / "gpt")
        ml.load_lora(base, tmp_path / "adapter")
        assert np.allclose(base.forward(np.arange(8).reshape(1, 8)), before, atol=1e-5)


def test_lora_fine_tuning_matches_numpy_in_float64():
    """30 AdamW steps of LoRA r=16 (the fused GPU AdamW kernel against NumPy's array code): the same losses."""
    ids = np.random.default_rng(1).integers(0, CFG["vocab_size"], size=3000).astype(np.uint8)

    def run():
        model = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
        gc.randomize_parameters(model, seed=1)
        ml.apply_lora(model, ml.LoRAConfig(r=16, alpha=8, targets="all-linear"))
        result = ml.train.fit(model, ids, ids, ml.train.TrainConfig(steps=30, batch_size=4, block_size=16, lr=1e-2,
                                                                    warmup_steps=3, eval_every=10, quiet=True,
                                                                    threads=1))
        return np.array([loss for _, loss in result.train + result.val])

    cpu, gpu = on("numpy", run), on("cupy", run)
    assert np.allclose(cpu, gpu, rtol=1e-9, atol=0), (cpu, gpu)


@pytest.mark.parametrize("kind", ["dense", "sparse", "fastfood"])
def test_intrinsic_projections_match_numpy(kind):
    from minilora import intrinsic

    rng = np.random.default_rng(0)
    theta_d, g = rng.standard_normal(7), rng.standard_normal(100)

    def run():
        projection = intrinsic.make_projection(kind, 100, 7, seed=3)
        return projection.project(backend.asarray(theta_d)), projection.transpose(backend.asarray(g))

    cpu, gpu = on("numpy", run), on("cupy", run)
    for a, b in zip(cpu, gpu):
        assert np.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_embedding_gradient_is_bit_reproducible_on_the_gpu():
    """The GPU's embedding backward (a one-hot matrix product) gives the same bits every run."""
    rng = np.random.default_rng(0)
    idx, dout = rng.integers(0, 7, size=(64, 33)), rng.standard_normal((64, 33, 5)).astype(np.float32)
    with backend.backend("cupy"):
        runs = [backend.to_numpy(ml.functional.embedding_backward(backend.asarray(dout), (backend.asarray(idx), (7, 5))))
                for _ in range(3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])
    expected = np.zeros((7, 5))
    np.add.at(expected, idx.reshape(-1), dout.reshape(-1, 5).astype(np.float64))
    assert np.allclose(runs[0], expected, rtol=1e-5, atol=1e-5)
