"""minilora's PEFT exit ramp, both ways, against the real PEFT on a tiny random GPT-2, for every kind of LoRA
adapter PEFT can save for it: PEFT's adapters load into minilora with PEFT's logits, minilora's adapters load into
PEFT with minilora's logits, and every adapter minilora cannot apply exactly is refused, naming the file, with the
model left exactly as it was."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PEFT reference tests need torch: pip install 'minilora[reference]'")
transformers = pytest.importorskip("transformers", reason="needs transformers: pip install 'minilora[reference]'")
peft = pytest.importorskip("peft", reason="needs peft: pip install 'minilora[reference]'")

import minilora as ml  # noqa: E402
from minilora import gradcheck as gc  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

CFG = dict(vocab_size=13, block_size=8, n_layer=2, n_head=3, n_embd=12)
IDX = np.arange(16).reshape(2, 8) % CFG["vocab_size"]     # every token id appears, trained rows included
TOL = 1e-9                                                # max |dlogit|, float64 against torch float64
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


# ----------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random GPT-2 in Hugging Face format: the base every PEFT adapter of this file belongs to."""
    base = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
    gc.randomize_parameters(base, 3)
    return ml.interop.save_hf_gpt2(base, tmp_path_factory.mktemp("base"))


def hf_model(base_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(base_dir, dtype=torch.float64)


def torch_logits(model):
    with torch.no_grad():
        return model(torch.from_numpy(IDX)).logits.numpy()


def minilora_logits(model):
    model.eval()
    return ml.backend.to_numpy(model.forward(IDX))


def peft_adapter(base_dir, adapter_dir, **lora_kwargs):
    """Train-like PEFT adapter: PEFT's random init, then every trainable tensor perturbed (so that no zero hides
    a mistake); saved to adapter_dir. Returns PEFT's logits on IDX."""
    lora_kwargs = {"r": 2, "lora_alpha": 3, **lora_kwargs}
    model = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    logits = torch_logits(model)
    model.save_pretrained(adapter_dir)
    return logits


def loaded_into_minilora(base_dir, adapter_dir):
    model = ml.interop.load_hf_gpt2(base_dir, dtype="float64")
    ml.interop.load_peft_adapter(model, adapter_dir)
    return model


def minilora_adapter(config, tmp_path):
    """A minilora GPT with the adapters of ``config``, every added parameter perturbed (the base stays as
    save_hf_gpt2 writes it), saved as an HF GPT-2 and a PEFT adapter. Returns (model, base dir, adapter dir)."""
    model = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
    gc.randomize_parameters(model, 3)
    ml.apply_lora(model, config)
    rng = np.random.default_rng(4)
    for _, p in model.named_parameters():
        if p.added_by is not None:
            noise = rng.standard_normal(p.shape) * 0.1
            p.data[...] = p.data + ml.backend.asarray(noise.astype(p.data.dtype))
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    ml.interop.save_hf_gpt2(model, base)
    ml.interop.save_peft_adapter(model, adapter)
    return model, base, adapter


def snapshot(model):
    """Everything a refused load must leave as it was: parameter values and flags, and the module tree."""
    params = {n: (ml.backend.to_numpy(p.data).copy(), p.trainable) for n, p in model.named_parameters()}
    return params, [n for n, _ in model.named_modules()]


def assert_same_snapshot(before, after):
    (params0, modules0), (params1, modules1) = before, after
    assert modules1 == modules0
    assert params1.keys() == params0.keys()
    for name, (data, trainable) in params0.items():
        assert np.array_equal(params1[name][0], data), f"{name} changed"
        assert params1[name][1] == trainable, f"{name}.trainable changed"


# ----------------------------------------------------------------------------------------------------
# direction 1: PEFT saves, minilora loads

PEFT_CONFIGS = {
    "c_attn": dict(target_modules=["c_attn"]),
    "all linear, rsLoRA": dict(target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True),
    "rank and alpha patterns": dict(target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 3},
                                    alpha_pattern={"h.1.attn.c_attn": 5}),
    "layers_to_transform": dict(target_modules=["c_attn", "c_fc"], layers_to_transform=[1]),
    "dropout (eval)": dict(target_modules=["c_attn"], lora_dropout=0.1),
    "save ln_f": dict(target_modules=["c_attn"], modules_to_save=["ln_f"]),
    "save lm_head (untied)": dict(target_modules=["c_attn"], modules_to_save=["lm_head"]),
    "save wte (head keeps the table)": dict(target_modules=["c_attn"], modules_to_save=["wte"]),
    "save wte and lm_head": dict(target_modules=["c_attn"], modules_to_save=["wte", "lm_head"]),
    "save lm_head, tied": dict(target_modules=["c_attn"], modules_to_save=["lm_head"], ensure_weight_tying=True),
    "save c_fc and ln_1": dict(target_modules=["c_attn"], modules_to_save=["c_fc", "ln_1"]),
    "lora_bias": dict(target_modules=["c_attn", "c_fc"], lora_bias=True),
    "trainable tokens": dict(target_modules=["c_attn"], trainable_token_indices=[1, 4]),
    "trainable tokens, dict form": dict(target_modules=["c_attn"], trainable_token_indices={"wte": [2, 3]}),
    "embedding LoRA and c_attn": dict(target_modules=["c_attn", "wte"]),
    "embedding LoRA alone": dict(target_modules=["wte"]),
    "DoRA": dict(target_modules=["c_attn", "c_fc"], use_dora=True),
    "DoRA and a saved table": dict(target_modules=["c_fc"], use_dora=True, modules_to_save=["wte"]),
    "save wte, tying asked (untied, as PEFT)": dict(target_modules=["c_attn"], modules_to_save=["wte"],
                                                    ensure_weight_tying=True),
    "exclude_modules": dict(target_modules=["c_attn", "c_fc"], exclude_modules=["transformer.h.0.mlp.c_fc"]),
    "target_modules as a regular expression": dict(target_modules=r".*\.h\.1\..*c_(attn|fc)"),
    "layers_pattern": dict(target_modules=["c_attn"], layers_to_transform=[0], layers_pattern="h"),
    "all-linear": dict(target_modules="all-linear"),
    "position table LoRA": dict(target_modules=["wpe", "c_proj"]),
    "save wpe and ln_2": dict(target_modules=["c_fc"], modules_to_save=["wpe", "ln_2"]),
    "lora_bias, rsLoRA, rank pattern": dict(target_modules=["c_attn", "c_proj"], lora_bias=True, use_rslora=True,
                                            rank_pattern={"c_proj": 1}),
}


def test_a_bfloat16_peft_adapter_loads_exactly(base_dir, tmp_path):
    """An adapter saved in bfloat16 (as PEFT saves one trained in bfloat16) loads with PEFT's logits: each value
    widens to float32 exactly, and PEFT's float64 model widens it the same way."""
    peft_adapter(base_dir, tmp_path / "adapter", target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f"])
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    tensors = {k: v.to(torch.bfloat16) for k, v in load_torch(tmp_path / "adapter" / WEIGHTS).items()}
    save_torch(tensors, tmp_path / "adapter" / WEIGHTS, metadata={"format": "pt"})
    expected = torch_logits(peft.PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter").eval())
    model = loaded_into_minilora(base_dir, tmp_path / "adapter")
    assert np.abs(minilora_logits(model) - expected).max() <= TOL


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_a_peft_adapter_loads_into_minilora_with_the_same_logits(name, base_dir, tmp_path):
    """An adapter trained and saved by PEFT gives, loaded into minilora over the same base, PEFT's logits."""
    expected = peft_adapter(base_dir, tmp_path / "adapter", **PEFT_CONFIGS[name])
    model = loaded_into_minilora(base_dir, tmp_path / "adapter")
    assert np.abs(minilora_logits(model) - expected).max() <= TOL


def test_the_peft_adapters_are_not_the_base_model(base_dir, tmp_path):
    """The cases above prove something: every adapter PEFT saves changes the base model's logits."""
    plain = torch_logits(hf_model(base_dir))
    for name, kwargs in PEFT_CONFIGS.items():
        logits = peft_adapter(base_dir, tmp_path / name, **kwargs)
        assert np.abs(logits - plain).max() > 1e-3, name


# ----------------------------------------------------------------------------------------------------
# direction 2: minilora saves, PEFT loads

QKV = ("q_proj", "k_proj", "v_proj")
MINILORA_CONFIGS = {
    "q, k, v": ml.LoRAConfig(r=2, alpha=3, targets=QKV),
    "all linear, rsLoRA": ml.LoRAConfig(r=2, alpha=3, targets=QKV + ("o_proj", "fc", "proj"), use_rslora=True),
    "q, v and fc": ml.LoRAConfig(r=2, alpha=3, targets=("q_proj", "v_proj", "fc")),
    "dropout (eval)": ml.LoRAConfig(r=2, alpha=3, targets=QKV, dropout=0.1),
    "save ln_f": ml.LoRAConfig(r=2, alpha=3, targets=QKV, modules_to_save=("ln_f",)),
    "save lm_head (untied)": ml.LoRAConfig(r=2, alpha=3, targets=QKV, modules_to_save=("lm_head",)),
    "save wte (head keeps the table)": ml.LoRAConfig(r=2, alpha=3, targets=QKV, modules_to_save=("wte",)),
    "save wte and lm_head": ml.LoRAConfig(r=2, alpha=3, targets=QKV, modules_to_save=("wte", "lm_head")),
    "save lm_head, tied": ml.LoRAConfig(r=2, alpha=3, targets=QKV, modules_to_save=("lm_head",),
                                        ensure_weight_tying=True),
    "save wte, tying asked (untied, as PEFT)": ml.LoRAConfig(r=2, alpha=3, targets=QKV, modules_to_save=("wte",),
                                                             ensure_weight_tying=True),
    "save fc and ln_1": ml.LoRAConfig(r=2, alpha=3, targets=QKV, modules_to_save=("fc", "ln_1")),
    "lora_bias": ml.LoRAConfig(r=2, alpha=3, targets=("q_proj", "v_proj", "fc"), lora_bias=True),
    "trainable tokens": ml.LoRAConfig(r=2, alpha=3, targets=QKV, trainable_token_indices=(1, 4)),
    "embedding LoRA and q, v": ml.LoRAConfig(r=2, alpha=3, targets=("q_proj", "v_proj", "wte")),
    "embedding LoRA alone": ml.LoRAConfig(r=2, alpha=3, targets=("wte",)),
    "DoRA": ml.LoRAConfig(r=2, alpha=3, targets=("q_proj", "v_proj", "fc"), use_dora=True),
}


@pytest.mark.parametrize("name", MINILORA_CONFIGS)
def test_a_minilora_adapter_loads_into_peft_with_the_same_logits(name, tmp_path):
    """An adapter saved by minilora gives, loaded by PEFT over the GPT-2 save_hf_gpt2 wrote, minilora's logits."""
    model, base, adapter = minilora_adapter(MINILORA_CONFIGS[name], tmp_path)
    theirs = peft.PeftModel.from_pretrained(hf_model(base), adapter).eval()
    assert np.abs(minilora_logits(model) - torch_logits(theirs)).max() <= TOL


@pytest.mark.parametrize("name", MINILORA_CONFIGS)
def test_a_minilora_adapter_loads_back_into_minilora(name, tmp_path):
    """The same adapter loaded into a fresh minilora base gives the logits of the model that saved it."""
    model, base, adapter = minilora_adapter(MINILORA_CONFIGS[name], tmp_path)
    expected = minilora_logits(model)
    assert gc.rel_error(minilora_logits(loaded_into_minilora(base, adapter)), expected) <= 1e-12
    assert np.abs(expected - minilora_logits(ml.interop.load_hf_gpt2(base, dtype="float64"))).max() > 1e-3


# ----------------------------------------------------------------------------------------------------
# gradients: every trainable parameter of a minilora adapter has the gradient PEFT's autograd gives the
# tensor it is exported as (or the block of it, for q, k and v fused in c_attn)

TARGETS = np.random.default_rng(6).integers(0, CFG["vocab_size"], IDX.shape)
PEFT_ROOT, HF_ROOT = "base_model.model", "base_model.model.transformer"
HF_NAMES = {"attn.o_proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
QV_FC, QV_O_PROJ = ("q_proj", "v_proj", "fc"), ("q_proj", "v_proj", "o_proj", "proj")
GRADIENT_CONFIGS = {
    "lora_bias, rsLoRA": ml.LoRAConfig(r=2, alpha=3, targets=QV_O_PROJ + ("fc",), lora_bias=True, use_rslora=True),
    "embedding LoRA and q, v, fc": ml.LoRAConfig(r=2, alpha=3, targets=QV_FC + ("wte",)),
    "trainable tokens (tied head)": ml.LoRAConfig(r=2, alpha=3, targets=QV_FC, trainable_token_indices=(1, 4)),
    "save ln_f, ln_1, fc, wte and lm_head": ml.LoRAConfig(r=2, alpha=3, targets=QV_O_PROJ,
                                                          modules_to_save=("ln_f", "ln_1", "fc", "wte", "lm_head")),
    "save wte (head keeps the table)": ml.LoRAConfig(r=2, alpha=3, targets=QV_FC, modules_to_save=("wte",)),
    "save lm_head, tied": ml.LoRAConfig(r=2, alpha=3, targets=QV_FC, modules_to_save=("lm_head",),
                                        ensure_weight_tying=True),
    "save wte, tying asked (untied, as PEFT)": ml.LoRAConfig(r=2, alpha=3, targets=QV_FC, modules_to_save=("wte",),
                                                             ensure_weight_tying=True),
}


def hf_name(module):
    """minilora's module name -> GPT2LMHeadModel's under PEFT's wrapper, e.g. h.0.mlp.fc -> ...h.0.mlp.c_fc."""
    for ours, theirs in HF_NAMES.items():
        if module.endswith("." + ours):
            return f"{HF_ROOT}.{module[: -len(ours)]}{theirs}"
    return f"{HF_ROOT}.{module}"


def fused_block(name, params, grads):
    """(PEFT's tensor name, its gradient's block) for a q/k/v parameter, e.g. h.0.attn.v_proj.lora_B.

    PEFT keeps one LoRA pair on the fused c_attn: A (sum of ranks, C) stacks the adapted parts' A in q, k, v
    order; B (3C, sum of ranks) holds each part's B on its block (rows: the part's third of the output;
    columns: its rank's slice), zero elsewhere; lora_B's bias (3C,) holds each part's bias in its third."""
    block, rest = name.split(".attn.")                         # "h.0", "v_proj.lora_B"
    projection, kind = rest.split(".")
    part = projection[0]                                       # "q", "k" or "v"
    adapted = [p for p in "qkv" if f"{block}.attn.{p}_proj.lora_A" in params]
    ranks = [params[f"{block}.attn.{p}_proj.lora_A"].shape[0] for p in adapted]
    start = sum(ranks[: adapted.index(part)])
    cols = slice(start, start + ranks[adapted.index(part)])
    C = CFG["n_embd"]
    rows = slice("qkv".index(part) * C, ("qkv".index(part) + 1) * C)
    fused = f"{HF_ROOT}.{block}.attn.c_attn"
    if kind == "lora_A":
        return f"{fused}.lora_A.default.weight", grads[f"{fused}.lora_A.default.weight"][cols]
    if kind == "lora_B":
        return f"{fused}.lora_B.default.weight", grads[f"{fused}.lora_B.default.weight"][rows, cols]
    return f"{fused}.lora_B.default.bias", grads[f"{fused}.lora_B.default.bias"][rows]


def peft_gradient(name, params, grads):
    """(PEFT's tensor name, PEFT's gradient) for minilora's trainable parameter ``name``."""
    module, _, leaf = name.rpartition(".")
    if name == "lm_head.weight":                               # the untied head: a trained copy of lm_head
        theirs = f"{PEFT_ROOT}.lm_head.modules_to_save.default.weight"
    elif name.split(".")[-2] in QKV:
        return fused_block(name, params, grads)
    elif leaf in ("lora_A", "lora_B"):
        theirs = f"{hf_name(module)}.{leaf}.default.weight"
    elif leaf == "lora_bias":
        theirs = f"{hf_name(module)}.lora_B.default.bias"
    elif leaf in ("lora_embedding_A", "lora_embedding_B"):
        theirs = f"{hf_name(module)}.{leaf}.default"
    elif leaf == "token_values":
        theirs = f"{hf_name(module)}.token_adapter.trainable_tokens_delta.default"
    elif module.endswith(".copy"):                             # modules_to_save: HF's layout is minilora's
        theirs = f"{hf_name(module.rpartition('.')[0])}.modules_to_save.default.{leaf}"
    else:
        raise AssertionError(f"no PEFT tensor is known for minilora's trainable parameter {name}")
    return theirs, grads[theirs]


def peft_trained_like(base, adapter):
    """PEFT's trainable model of a minilora adapter: PeftModel.from_pretrained(is_trainable=True), as a user
    resumes training (a tied table included: minilora writes it as modules_to_save=["lm_head"] with
    ensure_weight_tying, which PEFT ties again when it loads)."""
    model = peft.PeftModel.from_pretrained(hf_model(base), adapter, is_trainable=True)
    inner = model.base_model.model
    if isinstance(inner.lm_head, peft.utils.other.ModulesToSaveWrapper) and \
            peft.LoraConfig.from_pretrained(adapter).ensure_weight_tying:
        assert inner.lm_head.modules_to_save["default"].weight is inner.transformer.wte.modules_to_save["default"].weight
    return model


def assert_peft_gradients(model, theirs):
    """One training step's loss and gradients, minilora (hand-written backward) against PEFT (autograd): equal
    losses; every trainable minilora parameter has PEFT's gradient of the tensor (block) it is saved as, and every
    trainable PEFT tensor is compared with at least one minilora parameter."""
    model.train()          # every dropout is 0 (GPTConfig, LoRAConfig, and so the HF config): modes agree
    theirs.train()
    loss, dlogits = ml.cross_entropy(model.forward(IDX), TARGETS)
    model.backward(dlogits)
    logits = theirs(torch.from_numpy(IDX)).logits
    torch_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CFG["vocab_size"]),
                                                   torch.from_numpy(TARGETS).reshape(-1))
    torch_loss.backward()
    assert abs(loss - torch_loss.item()) <= 1e-12 * abs(loss)

    grads = {n: p.grad.numpy() for n, p in theirs.named_parameters() if p.requires_grad}
    params = {n: p for n, p in model.named_parameters() if p.trainable}
    matched, used = set(), set()
    for name, p in params.items():
        theirs_name, expected = peft_gradient(name, params, grads)
        assert p.grad is not None, f"{name} got no gradient"
        error = gc.rel_error(p.grad, expected)
        assert error <= 1e-9, f"{name} vs {theirs_name}: rel_error {error:.3g}"
        matched.add(name)
        used.add(theirs_name)
    assert matched == {n for n, p in model.named_parameters() if p.trainable}
    assert used == grads.keys()


@pytest.mark.parametrize("name", GRADIENT_CONFIGS)
def test_a_minilora_adapter_has_peft_autograd_gradients(name, tmp_path):
    """The same tokens and targets through minilora and PEFT, float64: the same loss and the same gradient of
    every trainable tensor, for each kind of adapter (the q/v blocks of the fused c_attn included)."""
    config = GRADIENT_CONFIGS[name]
    assert config.dropout == 0
    model, base, adapter = minilora_adapter(config, tmp_path)
    assert_peft_gradients(model, peft_trained_like(base, adapter))


# ----------------------------------------------------------------------------------------------------
# refusals: a PEFT adapter, spoiled one way, is refused naming the file; the model is left as it was


def write_config(data: bytes):
    def spoil(adapter):
        (adapter / CONFIG).write_bytes(data)
    return spoil


def edit_config(**changes):
    def spoil(adapter):
        config = json.loads((adapter / CONFIG).read_text())
        config.update(changes)
        (adapter / CONFIG).write_text(json.dumps(config))
    return spoil


def edit_tensors(change):
    def spoil(adapter):
        tensors = load_file(adapter / WEIGHTS)
        change(tensors)
        save_file(tensors, adapter / WEIGHTS, metadata={"format": "pt"})
    return spoil


def non_utf8(adapter):
    text = (adapter / CONFIG).read_bytes()
    (adapter / CONFIG).write_bytes(text.replace(b'"LORA"', b'"LO\xffRA"'))


def truncate(adapter):
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[:-5])


H0 = "base_model.model.transformer.h.0"
C_ATTN = dict(target_modules=["c_attn"])


def add_unknown(tensors):
    tensors[f"{H0}.attn.c_attn.lora_X.weight"] = np.ones((2, 12))


def nan_in_b(tensors):
    tensors[f"{H0}.attn.c_attn.lora_B.weight"][0, 0] = np.nan


def drop_b(tensors):
    del tensors[f"{H0}.attn.c_attn.lora_B.weight"]


# name: (PEFT config, how it is spoiled, the file(s) the message may name, text the message must contain)
REFUSALS = {
    "config is a JSON list": (C_ATTN, write_config(b"[1, 2]"), CONFIG, None),
    "config is {}": (C_ATTN, write_config(b"{}"), CONFIG, None),
    "lora_alpha null": (C_ATTN, edit_config(lora_alpha=None), CONFIG, "lora_alpha"),
    "r a string": (C_ATTN, edit_config(r="8"), CONFIG, None),
    "config not UTF-8": (C_ATTN, non_utf8, CONFIG, None),
    "config not JSON": (C_ATTN, write_config(b"r = 2\nlora_alpha = 3\n"), CONFIG, None),
    "weights truncated": (C_ATTN, truncate, WEIGHTS, None),
    "unknown tensor": (C_ATTN, edit_tensors(add_unknown), WEIGHTS, "lora_X"),
    "NaN in lora_B": (C_ATTN, edit_tensors(nan_in_b), WEIGHTS, "h.0.attn.c_attn.lora_B"),
    "lora_A without lora_B": (C_ATTN, edit_tensors(drop_b), WEIGHTS, "h.0.attn.c_attn"),
    "unknown config field": (C_ATTN, edit_config(frobnicate=1), CONFIG, "frobnicate"),
    "layer_replication": (C_ATTN, edit_config(layer_replication=[[0, 1]]), CONFIG, "layer_replication"),
    "use_qalora": (C_ATTN, edit_config(use_qalora=True), CONFIG, "use_qalora"),
    "target_parameters": (C_ATTN, edit_config(target_parameters=["transformer.h.0.attn.c_attn.weight"]), CONFIG,
                          "target_parameters"),
    "alora_invocation_tokens": (C_ATTN, edit_config(alora_invocation_tokens=[1]), CONFIG,
                                "alora_invocation_tokens"),
    "DoRA on the embedding": (dict(target_modules=["wte"], use_dora=True), None, (CONFIG, WEIGHTS), None),
    "LoRA on lm_head": (dict(target_modules=["lm_head"]), None, (CONFIG, WEIGHTS), "lm_head"),
    "PiSSA init": (C_ATTN, edit_config(init_lora_weights="pissa"), CONFIG,
                   "path_initial_model_for_weight_conversion"),
    "peft_type PREFIX_TUNING": (C_ATTN, edit_config(peft_type="PREFIX_TUNING"), CONFIG, "PREFIX_TUNING"),
}


def assert_refused(base_dir, adapter, files, needle=None):
    """load_peft_adapter raises a ValueError naming one of ``files`` (and ``needle``), changing nothing."""
    model = ml.interop.load_hf_gpt2(base_dir, dtype="float64")
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        ml.interop.load_peft_adapter(model, adapter)
    message = str(info.value)
    files = (files,) if isinstance(files, str) else files
    assert any(str(adapter / f) in message for f in files), message
    if needle is not None:
        assert needle in message, message
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("name", REFUSALS)
def test_an_adapter_minilora_cannot_apply_exactly_is_refused(name, base_dir, tmp_path):
    """Malformed files, unknown tensors or fields, and PEFT features minilora does not implement are each a
    ValueError naming the offending file; the model is unchanged."""
    kwargs, spoil, files, needle = REFUSALS[name]
    adapter = tmp_path / "adapter"
    peft_adapter(base_dir, adapter, **kwargs)
    if spoil is not None:
        spoil(adapter)
    assert_refused(base_dir, adapter, files, needle)


def test_a_tensor_for_a_module_target_modules_does_not_name_is_refused(base_dir, tmp_path):
    """target_modules says which modules carry LoRA: a lora_A/lora_B pair for c_fc in an adapter whose
    target_modules is ["c_attn"] is refused naming the weights file and the module, not applied."""
    adapter = tmp_path / "adapter"
    peft_adapter(base_dir, adapter, target_modules=["c_attn"])
    rng = np.random.default_rng(5)

    def add_c_fc(tensors):
        tensors[f"{H0}.mlp.c_fc.lora_A.weight"] = rng.standard_normal((2, 12))
        tensors[f"{H0}.mlp.c_fc.lora_B.weight"] = rng.standard_normal((48, 2))

    edit_tensors(add_c_fc)(adapter)
    assert_refused(base_dir, adapter, WEIGHTS, "c_fc")
