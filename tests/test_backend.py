"""Backend selection, dtype policy, seeding and atomic file writes."""
import os
import sys

import numpy as np
import pytest

import minilora as ml
from minilora import backend, files
from minilora import functional as F
from minilora.fast import functional as fast_functional
from minilora.fast import kernels

CFG = ml.GPTConfig(vocab_size=13, block_size=6, n_layer=2, n_head=2, n_embd=10)


@pytest.fixture(autouse=True)
def numpy_backend():
    ml.use_backend("numpy")
    yield
    ml.use_backend("numpy")


def tokens(B=2, T=6, V=13, seed=0):
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


# ----------------------------------------------------------------------------------------------------
# backend


def test_numpy_is_the_default_backend():
    assert ml.current_backend() == "numpy"
    assert backend.xp() is np
    assert type(ml.GPT(CFG).wte.weight.data) is np.ndarray


@pytest.mark.parametrize("name", ["numpy", "NumPy", " numpy "])
def test_use_backend_numpy(name):
    ml.use_backend(name)
    assert ml.current_backend() == "numpy" and backend.xp() is np


def test_backend_context_restores_the_previous_one():
    with backend.backend("numpy") as xp:
        assert xp is np
    assert ml.current_backend() == "numpy"


def test_to_numpy_and_asarray():
    a = np.arange(6.0).reshape(2, 3)
    assert ml.to_numpy(a) is a                               # host arrays pass through, no copy
    assert isinstance(ml.to_numpy([1, 2]), np.ndarray)
    b = ml.asarray([[1, 2], [3, 4]], dtype="float32")
    assert type(b) is np.ndarray and b.dtype == np.float32
    np.testing.assert_array_equal(b, [[1, 2], [3, 4]])
    assert backend.get_array_module(a) is np and backend.is_array(a) and not backend.is_array([1.0])


# ----------------------------------------------------------------------------------------------------
# seeding


def weights(model):
    return {name: p.data.copy() for name, p in model.named_parameters()}


def test_same_seed_same_weights_and_outputs():
    a, b = ml.GPT(CFG, seed=3), ml.GPT(CFG, seed=3)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)
    np.testing.assert_array_equal(a.forward(tokens()), b.forward(tokens()))


def test_different_seed_different_weights():
    wa, wb = weights(ml.GPT(CFG, seed=3)), weights(ml.GPT(CFG, seed=4))
    assert not np.array_equal(wa["wte.weight"], wb["wte.weight"])
    assert not np.array_equal(wa["h.0.attn.q_proj.weight"], wb["h.0.attn.q_proj.weight"])


def test_same_seed_same_dropout_masks():
    cfg = ml.GPTConfig(**{**CFG.to_dict(), "dropout": 0.3})
    a, b = ml.GPT(cfg, seed=1), ml.GPT(cfg, seed=1)
    np.testing.assert_array_equal(a.forward(tokens()), b.forward(tokens()))
    assert not np.array_equal(a.forward(tokens()), a.eval().forward(tokens()))   # dropout was active


def test_float64_model_starts_from_the_same_numbers():
    w32, w64 = weights(ml.GPT(CFG, seed=0)), weights(ml.GPT(CFG, seed=0, dtype="float64"))
    for name in w32:
        np.testing.assert_array_equal(w64[name].astype(np.float32), w32[name], err_msg=name)


# ----------------------------------------------------------------------------------------------------
# dtype policy


def arrays_in(obj):
    """Every ndarray inside a (nested) cache of tuples, lists and dicts."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from arrays_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from arrays_in(item)


def float_arrays_cached(model):
    """(where, dtype) of every floating array a forward left in the modules' caches."""
    found = []
    for name, module in model.named_modules():
        for a in arrays_in(module.__dict__.get("_cache")):
            if a.dtype.kind == "f":
                found.append((name or "GPT", a.dtype))
    return found


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_model_keeps_its_dtype_through_forward_and_backward(dtype, dropout):
    cfg = ml.GPTConfig(**{**CFG.to_dict(), "dropout": dropout})
    model = ml.GPT(cfg, seed=0, dtype=dtype)
    assert model.dtype == dtype
    assert {p.data.dtype for p in model.parameters()} == {np.dtype(dtype)}

    idx = tokens()
    logits = model.forward(idx)
    assert logits.dtype == dtype
    cached = float_arrays_cached(model)
    assert len({where for where, _ in cached}) > 10          # the caches were really reached
    assert {dt for _, dt in cached} == {np.dtype(dtype)}, [c for c in cached if c[1] != dtype]

    loss, dlogits = ml.cross_entropy(logits, idx)
    assert isinstance(loss, float) and dlogits.dtype == dtype
    model.backward(dlogits)
    grads = {name: p.grad.dtype for name, p in model.named_parameters()}
    assert set(grads.values()) == {np.dtype(dtype)}, grads

    opt = ml.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    assert {p.data.dtype for p in model.parameters()} == {np.dtype(dtype)}
    assert {m.dtype for m in opt.m + opt.v} == {np.dtype(dtype)}


def f32(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def cross_entropy_as_layer(x):
    loss, dlogits = F.softmax_cross_entropy(x, np.zeros(x.shape[:-1], dtype=np.int64))
    assert isinstance(loss, float)
    return dlogits, ()          # its "output" to check is dlogits; nothing to differentiate further


# layer -> (forward(x) -> (out, cache), backward(dout, cache) -> tuple of gradients); x is (2, 3, 4) float32
FUNCTIONAL = {
    "linear": (lambda x: F.linear_forward(x, f32(4, 5), f32(5)), F.linear_backward),
    "embedding": (lambda x: F.embedding_forward(np.array([[0, 1, 1]]), x[0]),
                  lambda d, c: (F.embedding_backward(d, c),)),
    "layernorm": (lambda x: F.layernorm_forward(x, f32(4), f32(4)), F.layernorm_backward),
    "gelu": (F.gelu_forward, lambda d, c: (F.gelu_backward(d, c),)),
    "attention": (lambda x: F.attention_forward(x, 2 * x, 3 * x, 2, 0.1, np.random.default_rng(0)),
                  F.attention_backward),
    "dropout": (lambda x: F.dropout_forward(x, 0.5, np.random.default_rng(0)),
                lambda d, c: (F.dropout_backward(d, c),)),
    "cross-entropy": (cross_entropy_as_layer, lambda d, c: ()),
}


@pytest.mark.parametrize("layer", list(FUNCTIONAL))
def test_functional_layers_never_upcast_float32(layer):
    forward, backward = FUNCTIONAL[layer]
    out, cache = forward(f32(2, 3, 4))
    assert out.dtype == np.float32
    assert {a.dtype for a in arrays_in(cache) if a.dtype.kind == "f"} <= {np.dtype(np.float32)}
    grads = [g for g in backward(np.ones_like(out), cache) if g is not None]
    assert all(g.dtype == np.float32 for g in grads), [g.dtype for g in grads]


@pytest.mark.parametrize("dtype, error", [
    ("float16", ValueError), ("int32", ValueError), (np.complex128, ValueError), ("bogus", TypeError),
])
def test_invalid_dtype_is_refused(dtype, error):
    with pytest.raises(error, match=r"dtype must be one of \('float32', 'float64'\)"):
        ml.GPT(CFG, dtype=dtype)


@pytest.mark.parametrize("dtype, name", [(None, "float32"), (np.float64, "float64"), ("float32", "float32")])
def test_resolve_dtype(dtype, name):
    assert backend.resolve_dtype(dtype) == name


# ----------------------------------------------------------------------------------------------------
# atomic writes


def listing(folder):
    return sorted(os.listdir(folder))


def test_files_round_trip_and_leave_no_temporary_files(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2)}
    files.save_safetensors(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    files.write_json(tmp_path / "c.json", {"n_layer": 2, "name": "tiny"})
    assert listing(tmp_path) == ["c.json", "t.safetensors"]
    loaded, metadata = files.load_safetensors(tmp_path / "t.safetensors")
    assert metadata == {"format": "pt", files.SEAL: files.content_sha256(tensors, {"format": "pt"})}
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype
        np.testing.assert_array_equal(loaded[k], v)
    assert files.read_json(tmp_path / "c.json") == {"n_layer": 2, "name": "tiny"}


def test_model_weights_round_trip_through_safetensors(tmp_path):
    model = ml.GPT(CFG, seed=0)
    files.save_safetensors(model.state_dict(), tmp_path / "m.safetensors")
    other = ml.GPT(CFG, seed=1)
    other.load_state_dict(files.load_safetensors(tmp_path / "m.safetensors")[0])
    np.testing.assert_array_equal(other.forward(tokens()), model.forward(tokens()))


def failing_fsync(fd):
    raise OSError("disk full (simulated)")


SAVES = {
    "safetensors": (lambda path, value: files.save_safetensors({"w": value}, path), "t.safetensors"),
    "json": (lambda path, value: files.write_json(path, {"w": value}), "c.json"),
}


@pytest.mark.parametrize("kind", list(SAVES))
@pytest.mark.parametrize("failure", ["bad value", "crash while writing"])
def test_a_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch, kind, failure):
    save, name = SAVES[kind]
    path = tmp_path / name
    save(path, np.arange(3.0) if kind == "safetensors" else [1, 2, 3])
    old = path.read_bytes()
    if failure == "bad value":
        bad, error = object(), TypeError      # neither an array nor JSON-serialisable
    else:
        monkeypatch.setattr(files.os, "fsync", failing_fsync)
        bad, error = (np.zeros(5) if kind == "safetensors" else [4, 5]), OSError
    with pytest.raises(error):
        save(path, bad)
    assert path.read_bytes() == old
    assert listing(tmp_path) == [name]        # the temporary file was removed


# ----------------------------------------------------------------------------------------------------
# generator states, scatter-add, GPU kernels


def test_generator_state_rewinds_a_generator():
    g = backend.rng(3)
    state = backend.generator_state(g)
    first = g.random(5)
    assert not np.array_equal(first, g.random(5))
    backend.set_generator_state(g, state)
    assert np.array_equal(first, g.random(5))


@pytest.mark.parametrize("shape", [(7,), (7, 3)])
def test_scatter_add_accumulates_repeated_indices(shape):
    rng = np.random.default_rng(0)
    indices = rng.integers(0, shape[0], size=40)
    values = rng.standard_normal((40, *shape[1:]))
    target, expected = np.ones(shape), np.ones(shape)
    fast_functional.scatter_add(target, indices, values)
    np.add.at(expected, indices, values)
    assert np.allclose(target, expected, rtol=1e-13, atol=1e-13)
    fast_functional.scatter_add(target, indices[:0], values[:0])          # nothing to add: unchanged
    assert np.allclose(target, expected, rtol=1e-13, atol=1e-13)


def test_gpu_kernels_need_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ValueError, match="CuPy"):
        kernels.elementwise_kernel("T x", "T y", "y = x;", "minilora_test_copy")
