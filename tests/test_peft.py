"""LoRA adapters against Hugging Face PEFT: exported adapters give PEFT's logits and gradients; PEFT's load."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PEFT reference tests need torch: pip install 'minilora[reference]'")
transformers = pytest.importorskip("transformers", reason="needs transformers: pip install 'minilora[reference]'")
peft = pytest.importorskip("peft", reason="needs peft: pip install 'minilora[reference]'")

import minilora as ml  # noqa: E402
from minilora import gradcheck as gc  # noqa: E402
from minilora import interop, lora  # noqa: E402

CFG = dict(vocab_size=13, block_size=8, n_layer=2, n_head=3, n_embd=12)


def adapted_model(config, seed=0):
    model = ml.GPT(ml.GPTConfig(**CFG), seed=seed, dtype="float64")
    gc.randomize_parameters(model, seed)
    ml.apply_lora(model, config, seed=seed)
    rng = np.random.default_rng(seed + 10)
    for _, m in lora.lora_modules(model):          # non-zero A and B: B = 0 would hide any mistake
        m.lora_A.data[...] = ml.backend.asarray(rng.standard_normal(m.lora_A.shape) * 0.3)
        m.lora_B.data[...] = ml.backend.asarray(rng.standard_normal(m.lora_B.shape) * 0.3)
    return model


def peft_model(model, tmp_path):
    interop.save_hf_gpt2(model, tmp_path / "base")
    interop.save_peft_adapter(model, tmp_path / "adapter")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float64)
    return peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True).eval()


def tokens(seed=0):
    return np.random.default_rng(seed).integers(0, CFG["vocab_size"], (2, 8))


CONFIGS = {
    "q,v (paper)": ml.LoRAConfig(r=2, alpha=5),
    "k only": ml.LoRAConfig(r=3, alpha=2, targets="k_proj"),
    "all-linear rsLoRA": ml.LoRAConfig(r=2, alpha=3, targets="all-linear", use_rslora=True),
    "q,k,v,o": ml.LoRAConfig(r=1, alpha=1, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_exported_adapter_gives_peft_the_same_logits(name, tmp_path):
    model = adapted_model(CONFIGS[name])
    theirs = peft_model(model, tmp_path)
    idx = tokens()
    with torch.no_grad():
        logits = theirs(torch.from_numpy(idx)).logits.numpy()
    assert gc.rel_error(model.forward(idx), logits) <= 1e-9


def test_gradients_of_a_and_b_equal_peft_autograd(tmp_path):
    model = adapted_model(ml.LoRAConfig(r=2, alpha=5, targets=("q_proj", "v_proj", "fc")))
    theirs = peft_model(model, tmp_path)
    idx, targets = tokens(), tokens(1)
    loss, dlogits = ml.cross_entropy(model.forward(idx), targets)
    model.backward(dlogits)
    out = theirs(torch.from_numpy(idx)).logits
    torch_loss = torch.nn.functional.cross_entropy(out.reshape(-1, CFG["vocab_size"]), torch.from_numpy(targets).reshape(-1))
    torch_loss.backward()
    assert abs(loss - torch_loss.item()) <= 1e-12 * abs(loss)
    grads = {n: p.grad.numpy() for n, p in theirs.named_parameters() if "lora_" in n}
    C = CFG["n_embd"]
    for i in range(CFG["n_layer"]):
        prefix = f"base_model.model.transformer.h.{i}"
        q, v = model.h[i].attn.q_proj, model.h[i].attn.v_proj
        gA = grads[f"{prefix}.attn.c_attn.lora_A.default.weight"]          # (2r, C): rows [q's | v's]
        gB = grads[f"{prefix}.attn.c_attn.lora_B.default.weight"]          # (3C, 2r)
        assert gc.rel_error(q.lora_A.grad, gA[:2]) <= 1e-9 and gc.rel_error(v.lora_A.grad, gA[2:]) <= 1e-9
        assert gc.rel_error(q.lora_B.grad, gB[:C, :2]) <= 1e-9
        assert gc.rel_error(v.lora_B.grad, gB[2 * C:, 2:]) <= 1e-9
        fc = model.h[i].mlp.fc
        assert gc.rel_error(fc.lora_A.grad, grads[f"{prefix}.mlp.c_fc.lora_A.default.weight"]) <= 1e-9
        assert gc.rel_error(fc.lora_B.grad, grads[f"{prefix}.mlp.c_fc.lora_B.default.weight"]) <= 1e-9


def test_round_trip_through_peft_files_recovers_the_adapters(tmp_path):
    model = adapted_model(ml.LoRAConfig(r=2, alpha=5))
    interop.save_peft_adapter(model, tmp_path)
    fresh = ml.GPT(model.config, seed=0, dtype="float64")
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k})
    interop.load_peft_adapter(fresh, tmp_path)
    assert [n for n, _ in lora.lora_modules(fresh)] == [n for n, _ in lora.lora_modules(model)]
    assert all(m.r == 2 for _, m in lora.lora_modules(fresh))          # the block structure was undone
    assert gc.rel_error(fresh.forward(tokens()), model.forward(tokens())) <= 1e-12


def test_an_adapter_trained_in_peft_loads_into_minilora(tmp_path):
    base = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
    gc.randomize_parameters(base, 3)
    interop.save_hf_gpt2(base, tmp_path / "base")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base", dtype=torch.float64)
    config = peft.LoraConfig(r=3, lora_alpha=7, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                             init_lora_weights=False)          # random A and B, as after training
    theirs = peft.get_peft_model(hf, config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    idx = tokens(2)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(idx)).logits.numpy()
    interop.load_peft_adapter(base, tmp_path / "adapter")
    names = {n.split(".", 2)[2] for n, _ in lora.lora_modules(base)}
    assert names == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.proj"}
    assert gc.rel_error(base.forward(idx), expected) <= 1e-9


def test_unsupported_or_mismatched_adapters_are_clear_errors(tmp_path):
    model = adapted_model(ml.LoRAConfig(r=2, alpha=5, bias="lora_only"))
    with pytest.raises(ValueError, match="bias='lora_only'"):
        interop.save_peft_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="already has LoRA"):
        interop.load_peft_adapter(model, tmp_path)
    ml.merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        interop.save_peft_adapter(model, tmp_path)
    small = adapted_model(ml.LoRAConfig(r=2, alpha=5))
    interop.save_peft_adapter(small, tmp_path / "a")
    wider = ml.GPT(ml.GPTConfig(**{**CFG, "n_embd": 15}), seed=0, dtype="float64")
    with pytest.raises(ValueError, match="c_attn needs"):
        interop.load_peft_adapter(wider, tmp_path / "a")
