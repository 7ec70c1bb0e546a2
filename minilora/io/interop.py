"""Hugging Face GPT-2 checkpoints in and out (config.json + model.safetensors), without torch.

Names and layouts. HF GPT-2 stores linear weights as ``Conv1D`` with shape (in, out), as minilora does, and
fuses the query, key and value projections into one ``c_attn`` of shape (C, 3C) whose columns are
[q | k | v]. minilora keeps them separate, so saving joins them and loading splits them, exactly.

    minilora                          HF GPT2LMHeadModel
    wte.weight / wpe.weight           transformer.wte.weight / transformer.wpe.weight (lm_head tied to wte)
    h.{i}.ln_1 / ln_2                 transformer.h.{i}.ln_1 / ln_2
    h.{i}.attn.{q,k,v}_proj           transformer.h.{i}.attn.c_attn   (columns [q | k | v])
    h.{i}.attn.o_proj                 transformer.h.{i}.attn.c_proj
    h.{i}.mlp.fc / mlp.proj           transformer.h.{i}.mlp.c_fc / mlp.c_proj
    ln_f                              transformer.ln_f
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy

from ..core import backend
from .files import load_safetensors, read_json, save_safetensors, write_json
from ..core.model import GPT, GPTConfig

_RENAMES = {  # per-block HF name -> minilora name (c_attn is handled apart: it is split in three)
    "ln_1": "ln_1", "ln_2": "ln_2", "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")


def to_hf_state_dict(arrays: dict, n_layer: int, prefix: str = "transformer.") -> dict:
    """minilora {name: array} -> HF GPT-2 {name: NumPy array} (q, k, v joined into c_attn).

    Works for weights and for gradients alike (both have the parameters' names and shapes).
    """
    host = {name: backend.to_numpy(a) for name, a in arrays.items()}
    out = {f"{prefix}{name}": host[f"{name}"] for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        for hf, ours in _RENAMES.items():
            for kind in ("weight", "bias"):
                out[f"{prefix}h.{i}.{hf}.{kind}"] = host[f"h.{i}.{ours}.{kind}"]
        for kind in ("weight", "bias"):
            parts = [host[f"h.{i}.attn.{p}.{kind}"] for p in _QKV]
            out[f"{prefix}h.{i}.attn.c_attn.{kind}"] = numpy.concatenate(parts, axis=-1)   # [q | k | v]
    return out


def from_hf_state_dict(hf: dict, n_layer: int, n_embd: int) -> dict:
    """HF GPT-2 {name: array} (with or without the "transformer." prefix) -> minilora {name: array}.

    Every tensor is accounted for: a float tensor GPT-2 has is used, the attention-mask buffers old checkpoints
    carry (attn.bias, attn.masked_bias) and a tied lm_head are checked or skipped, and anything else (a layer
    beyond n_layer, a tensor of another architecture) is an error naming it."""
    used = set()

    def get(name):
        for key in (f"transformer.{name}", name):
            if key in hf:
                used.add(key)
                if numpy.dtype(hf[key].dtype).kind != "f":
                    raise ValueError(f"the GPT-2 tensor {key!r} has dtype {hf[key].dtype}; expected a float type")
                return hf[key]
        raise ValueError(f"the GPT-2 checkpoint has no tensor {name!r} (nor 'transformer.{name}')")

    out = {name: get(name) for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    for i in range(n_layer):
        for hf_name, ours in _RENAMES.items():
            for kind in ("weight", "bias"):
                out[f"h.{i}.{ours}.{kind}"] = get(f"h.{i}.{hf_name}.{kind}")
        for kind in ("weight", "bias"):
            fused = get(f"h.{i}.attn.c_attn.{kind}")
            if fused.shape[-1] != 3 * n_embd:
                raise ValueError(f"h.{i}.attn.c_attn.{kind} has shape {fused.shape}; expected last axis 3 * {n_embd}")
            for j, p in enumerate(_QKV):
                out[f"h.{i}.attn.{p}.{kind}"] = fused[..., j * n_embd:(j + 1) * n_embd]   # split [q | k | v]
    lm_head = hf.get("lm_head.weight")
    if lm_head is not None and not numpy.array_equal(backend.to_numpy(lm_head), backend.to_numpy(out["wte.weight"])):
        raise ValueError("lm_head.weight differs from wte.weight: minilora's GPT ties its output head to the "
                         "token embedding and cannot load an untied head")
    buffers = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
    unknown = sorted(k for k in hf if k not in used and k != "lm_head.weight" and not buffers.match(k))
    if unknown:
        raise ValueError(f"the GPT-2 checkpoint holds tensors a GPT-2 of {n_layer} layers does not have: "
                         f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return out


def hf_config(config: GPTConfig, dtype: str) -> dict:
    """The config.json that transformers' GPT2LMHeadModel reads for this architecture."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def save_hf_gpt2(model: GPT, path) -> Path:
    """Write ``path/config.json`` and ``path/model.safetensors`` for transformers' GPT2LMHeadModel."""
    if not isinstance(model, GPT):
        raise TypeError(f"save_hf_gpt2 expects a minilora GPT; got {type(model).__name__}")
    path = Path(path)
    tensors = to_hf_state_dict(model.state_dict(), model.config.n_layer)
    save_safetensors(tensors, path / "model.safetensors", metadata={"format": "pt"})
    write_json(path / "config.json", hf_config(model.config, model.dtype))
    return path


def _read_hf_tensors(path: Path) -> dict:
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return load_safetensors(single)[0]
    if index.is_file():   # a sharded checkpoint: the index maps each tensor to its file
        weight_map = read_json(index).get("weight_map", {})
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(load_safetensors(path / shard)[0])
        return tensors
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")


def load_hf_gpt2(path, dtype="float32", dropout: float = 0.0) -> GPT:
    """Read a GPT-2 directory (config.json + safetensors), as written by save_hf_gpt2 or transformers.

    Any GPT-2 size; the weights are cast to ``dtype``. dropout: the dropout of the returned model.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no GPT-2 directory at {path}")
    hf = read_json(path / "config.json")
    missing = [key for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if key not in hf]
    if missing:
        raise ValueError(f"{path / 'config.json'} lacks {missing}: a GPT-2 config always has them (refusing to "
                         "guess the architecture)")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{path}/config.json describes model_type {hf.get('model_type')!r}; expected 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"activation_function {act!r} is not supported: minilora's GELU is the tanh form ('gelu_new')")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 768)):
        raise ValueError(f"n_inner {hf.get('n_inner')} is not supported: minilora's MLP is 4 * n_embd wide")
    if hf.get("scale_attn_by_inverse_layer_idx", False) or not hf.get("scale_attn_weights", True):
        raise ValueError("only GPT-2's standard attention scaling 1/sqrt(head size) is supported")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("tie_word_embeddings is false: minilora's GPT always ties its output head to wte")
    config = GPTConfig(
        vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768),
        dropout=dropout, layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
    )
    state = from_hf_state_dict(_read_hf_tensors(path), config.n_layer, config.n_embd)
    model = GPT(config, seed=0, dtype=dtype)
    model.load_state_dict(state)
    return model


# PEFT adapters live in peft_files.py; these names are part of the public interop API
from .peft_files import PEFT_CONFIG_COPY, load_peft_adapter, read_peft_config, save_peft_adapter  # noqa: E402,F401

__all__ = ["PEFT_CONFIG_COPY", "from_hf_state_dict", "hf_config", "load_hf_gpt2", "load_peft_adapter",
           "read_peft_config", "save_hf_gpt2", "save_peft_adapter", "to_hf_state_dict"]
