"""Hugging Face GPT-2 checkpoints in and out: round trips through transformers, exact q/k/v split and join,
and clear errors for damaged or incompatible checkpoints.
"""
import numpy
import pytest

torch = pytest.importorskip("torch", reason="the interop tests need torch: pip install 'minilora[reference]'")
transformers = pytest.importorskip(
    "transformers", reason="the interop tests need transformers: pip install 'minilora[reference]'")
from safetensors.numpy import load_file, save_file  # noqa: E402  (a minilora dependency)

import minilora as ml  # noqa: E402
from minilora.gradcheck import randomize_parameters, rel_error  # noqa: E402
from minilora.interop import from_hf_state_dict, load_hf_gpt2, save_hf_gpt2, to_hf_state_dict  # noqa: E402

TOL = 1e-9
CONFIG = ml.GPTConfig(vocab_size=17, block_size=12, n_layer=2, n_head=3, n_embd=18)


# ----------------------------------------------------------------------------------------------------
# helpers


def random_model(dtype="float64", seed=0, config=CONFIG):
    model = ml.GPT(config, seed=seed, dtype=dtype)
    randomize_parameters(model, seed=seed, scale=0.1)
    return model


def tokens(config=CONFIG, B=2, T=7, seed=0):
    return numpy.random.default_rng(seed).integers(0, config.vocab_size, size=(B, T))


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(idx)).logits.numpy()


def assert_same_parameters(a, b):
    """Bit-identical parameters: same names, dtypes and values."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert numpy.array_equal(sa[name], sb[name]), f"{name} changed in the round trip"


def saved_checkpoint(tmp_path):
    """A minilora model saved as an HF checkpoint; returns (model, directory)."""
    model = random_model()
    return model, save_hf_gpt2(model, tmp_path / "ckpt")


def rewrite_tensors(path, edit):
    """Load path/model.safetensors, apply edit(tensors) in place, write it back."""
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------
# round trips through transformers


def test_minilora_checkpoint_loads_in_transformers(tmp_path):
    model = random_model()
    save_hf_gpt2(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager")
    assert hf.dtype == torch.float64
    assert hf.lm_head.weight is hf.transformer.wte.weight
    idx = tokens()
    err = rel_error(model.forward(idx), hf_logits(hf, idx))
    assert err <= TOL, f"logits: relative error {err:.3e}"


def test_transformers_checkpoint_loads_in_minilora(tmp_path):
    hf_config = transformers.GPT2Config(
        vocab_size=CONFIG.vocab_size, n_positions=CONFIG.block_size, n_embd=CONFIG.n_embd, n_layer=CONFIG.n_layer,
        n_head=CONFIG.n_head, activation_function="gelu_new", bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    hf = transformers.GPT2LMHeadModel(hf_config).double().eval()
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():   # non-trivial biases and LayerNorm (HF initialises them to 0 and 1)
        for p in hf.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=noise, dtype=p.dtype))
    hf.save_pretrained(tmp_path)

    model = load_hf_gpt2(tmp_path, dtype="float64")
    assert model.dtype == "float64"
    idx = tokens()
    err = rel_error(model.forward(idx), hf_logits(hf, idx))
    assert err <= TOL, f"logits: relative error {err:.3e}"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_then_load_is_bit_identical(tmp_path, dtype):
    model = random_model(dtype)
    loaded = load_hf_gpt2(save_hf_gpt2(model, tmp_path), dtype=dtype)
    assert loaded.config == model.config
    assert_same_parameters(model, loaded)


def test_qkv_split_then_join_is_exact():
    state = random_model().state_dict()
    hf = to_hf_state_dict(state, CONFIG.n_layer)
    assert hf["transformer.h.0.attn.c_attn.weight"].shape == (CONFIG.n_embd, 3 * CONFIG.n_embd)
    back = from_hf_state_dict(hf, CONFIG.n_layer, CONFIG.n_embd)
    assert sorted(back) == sorted(state)
    for name in state:
        assert numpy.array_equal(ml.backend.to_numpy(back[name]), ml.backend.to_numpy(state[name])), name
    again = to_hf_state_dict(back, CONFIG.n_layer)
    for name in hf:
        assert numpy.array_equal(again[name], hf[name]), name


# ----------------------------------------------------------------------------------------------------
# damaged or incompatible checkpoints: a ValueError that says what and where


def test_corrupt_file_raises_value_error_naming_it(tmp_path):
    _, path = saved_checkpoint(tmp_path)
    (path / "model.safetensors").write_bytes(numpy.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_gpt2(path)


@pytest.mark.parametrize("keep", [4, 40, 0.5, -1], ids=["4-bytes", "in-header", "half", "last-byte-cut"])
def test_truncated_file_raises_value_error_naming_it(tmp_path, keep):
    _, path = saved_checkpoint(tmp_path)
    file = path / "model.safetensors"
    raw = file.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep % len(raw)
    file.write_bytes(raw[:n])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_gpt2(path)


def test_missing_tensor_raises_value_error_naming_it(tmp_path):
    _, path = saved_checkpoint(tmp_path)
    rewrite_tensors(path, lambda t: t.pop("transformer.h.1.attn.c_attn.weight"))
    with pytest.raises(ValueError, match=r"h\.1\.attn\.c_attn\.weight"):
        load_hf_gpt2(path)


def test_untied_lm_head_raises_value_error(tmp_path):
    _, path = saved_checkpoint(tmp_path)
    rewrite_tensors(path, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1.0}))
    with pytest.raises(ValueError, match="lm_head"):
        load_hf_gpt2(path)


def test_tied_lm_head_copy_is_accepted(tmp_path):
    """A checkpoint that stores the head explicitly, equal to wte, is still a tied GPT-2."""
    model, path = saved_checkpoint(tmp_path)
    rewrite_tensors(path, lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].copy()}))
    assert_same_parameters(model, load_hf_gpt2(path, dtype="float64"))
