"""Ring 2 of the verification: the whole minilora GPT against transformers' GPT2LMHeadModel, float64.

Both models get the same (randomised, so biases and LayerNorm are not trivial) weights through
``minilora.interop.to_hf_state_dict``; logits, loss and the gradient of every parameter must agree to a
relative error of 1e-9, as llm.c's ``test_gpt2.c`` checks its model against a PyTorch dump.
"""
import numpy
import pytest

torch = pytest.importorskip("torch", reason="the GPT-2 reference tests need torch: pip install 'minilora[reference]'")
transformers = pytest.importorskip(
    "transformers", reason="the GPT-2 reference tests need transformers: pip install 'minilora[reference]'")

import minilora as ml  # noqa: E402
from minilora.gradcheck import randomize_parameters, rel_error  # noqa: E402
from minilora.interop import to_hf_state_dict  # noqa: E402

TOL = 1e-9

# (config, B, T): every T is shorter than block_size, so the positions beyond T stay unused
CASES = {
    "default-like": (ml.GPTConfig(), 2, 24),
    "1-layer-1-head": (ml.GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=1, n_embd=8), 3, 5),
    "C18-H3": (ml.GPTConfig(vocab_size=17, block_size=12, n_layer=2, n_head=3, n_embd=18), 2, 9),
    "T1": (ml.GPTConfig(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=12), 2, 1),
}


# ----------------------------------------------------------------------------------------------------
# helpers


def minilora_model(config, seed=0):
    model = ml.GPT(config, seed=seed, dtype="float64")
    randomize_parameters(model, seed=seed, scale=0.1)
    return model


def hf_twin(model, attn_implementation="eager"):
    """A float64 GPT2LMHeadModel holding ``model``'s weights (every parameter set; lm_head tied to wte)."""
    c = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=c.layer_norm_epsilon, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn_implementation,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).double().eval()
    assert hf.config._attn_implementation == attn_implementation
    assert hf.lm_head.weight is hf.transformer.wte.weight, "the HF head must be tied to wte"

    weights = to_hf_state_dict(model.state_dict(), c.n_layer)
    params = dict(hf.named_parameters())    # tied: lm_head.weight is listed once, as transformer.wte.weight
    assert sorted(params) == sorted(weights), "to_hf_state_dict must name every HF parameter, and only those"
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(weights[name]))
    return hf


def sample_batch(config, B, T, seed=0, ignore_index=None):
    rng = numpy.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, size=(B, T))
    targets = rng.integers(0, config.vocab_size, size=(B, T))
    if ignore_index is not None:
        targets[0, 0] = ignore_index     # and targets[-1, -1] stays counted, so the mean is defined
    return idx, targets


def assert_close(ours, theirs, what):
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != HF {theirs.shape}"
    err = rel_error(ours, theirs)
    assert err <= TOL, f"{what}: relative error {err:.3e} against transformers exceeds {TOL:.0e}"


# ----------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("ignore_index", [None, -100], ids=["plain", "ignore_index"])
@pytest.mark.parametrize("case", list(CASES))
def test_gpt_matches_hf_gpt2(case, ignore_index):
    """Logits, loss and every parameter's gradient, against GPT2LMHeadModel (eager attention)."""
    config, B, T = CASES[case]
    model = minilora_model(config)
    hf = hf_twin(model)
    idx, targets = sample_batch(config, B, T, ignore_index=ignore_index)

    logits = model.forward(idx)
    loss, dlogits = ml.cross_entropy(logits, targets, ignore_index)
    model.backward(dlogits)

    hf_logits = hf(input_ids=torch.from_numpy(idx)).logits
    kwargs = {} if ignore_index is None else {"ignore_index": ignore_index}
    hf_loss = torch.nn.functional.cross_entropy(
        hf_logits.view(-1, config.vocab_size), torch.from_numpy(targets).view(-1), **kwargs)
    hf_loss.backward()

    assert_close(logits, hf_logits.detach().numpy(), "logits")
    assert_close(numpy.array(loss), hf_loss.detach().numpy(), "loss")
    grads = to_hf_state_dict({name: p.grad for name, p in model.named_parameters()}, config.n_layer)
    hf_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    assert sorted(grads) == sorted(hf_grads)
    for name in hf_grads:
        assert_close(grads[name], hf_grads[name], f"grad of {name}")


@pytest.mark.parametrize("case", list(CASES))
def test_gpt_logits_match_hf_sdpa_attention(case):
    """The same logits against HF's scaled_dot_product_attention implementation."""
    config, B, T = CASES[case]
    model = minilora_model(config, seed=1)
    hf = hf_twin(model, attn_implementation="sdpa")
    idx, _ = sample_batch(config, B, T, seed=1)
    with torch.no_grad():
        hf_logits = hf(input_ids=torch.from_numpy(idx)).logits.numpy()
    assert_close(model.forward(idx), hf_logits, "logits")
