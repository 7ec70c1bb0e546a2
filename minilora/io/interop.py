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
from contextlib import ExitStack
from pathlib import Path

import numpy

from ..core import backend
from .files import SafetensorsReader, read_json, save_safetensors, write_json
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


def _gpt2_tensors(n_layer: int, n_embd: int):
    """Yield (HF name without "transformer.", [(minilora name, the columns it takes, or None for all)]) for every
    weight of a GPT-2, wte first; c_attn's columns are [q | k | v]."""
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"):
        yield name, [(name, None)]
    for i in range(n_layer):
        for hf_name, ours in _RENAMES.items():
            for kind in ("weight", "bias"):
                yield f"h.{i}.{hf_name}.{kind}", [(f"h.{i}.{ours}.{kind}", None)]
        for kind in ("weight", "bias"):
            yield f"h.{i}.attn.c_attn.{kind}", [(f"h.{i}.attn.{p}.{kind}", slice(j * n_embd, (j + 1) * n_embd))
                                                for j, p in enumerate(_QKV)]


def hf_tensor_shapes(config: GPTConfig) -> dict:
    """{HF name without "transformer.": shape} of every weight of a GPT-2 of this architecture, in HF's layout
    (Conv1D weights (in, out), c_attn fused)."""
    C = config.n_embd
    shapes = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.block_size, C),
              "ln_f.weight": (C,), "ln_f.bias": (C,)}
    linear = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    for i in range(config.n_layer):
        for norm in ("ln_1", "ln_2"):
            shapes[f"h.{i}.{norm}.weight"] = shapes[f"h.{i}.{norm}.bias"] = (C,)
        for name, (n_in, n_out) in linear.items():
            shapes[f"h.{i}.{name}.weight"], shapes[f"h.{i}.{name}.bias"] = (n_in, n_out), (n_out,)
    return shapes


_BUFFERS = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")   # old checkpoints' attention masks
_UNTIED = ("lm_head.weight differs from wte.weight: minilora's GPT ties its output head to the token embedding and "
           "cannot load an untied head")


def _unknown_tensors(names, used: set, n_layer: int) -> ValueError | None:
    """The error for stored tensors a GPT-2 has no use for (not taken, not a tied head, not a mask buffer)."""
    unknown = sorted(k for k in names if k not in used and k != "lm_head.weight" and not _BUFFERS.match(k))
    if not unknown:
        return None
    return ValueError(f"the GPT-2 checkpoint holds tensors a GPT-2 of {n_layer} layers does not have: "
                      f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")


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

    out = {}
    for name, targets in _gpt2_tensors(n_layer, n_embd):
        array = get(name)
        if len(targets) > 1 and array.shape[-1] != 3 * n_embd:
            raise ValueError(f"{name} has shape {array.shape}; expected last axis 3 * {n_embd}")
        for ours, columns in targets:
            out[ours] = array if columns is None else array[..., columns]
    lm_head = hf.get("lm_head.weight")
    if lm_head is not None and not numpy.array_equal(backend.to_numpy(lm_head), backend.to_numpy(out["wte.weight"])):
        raise ValueError(_UNTIED)
    unknown = _unknown_tensors(hf, used, n_layer)
    if unknown is not None:
        raise unknown
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


def _open_hf_tensors(path: Path, stack: ExitStack) -> dict:
    """{stored tensor name: the open SafetensorsReader of the file holding it}, for a single or sharded checkpoint."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():   # a sharded checkpoint: the index maps each tensor to its file
        weight_map = read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map must map tensor names to shard file names; got {weight_map!r}")
        files = [path / shard for shard in sorted(set(weight_map.values()))]
    else:
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
    found = {}
    for file in files:
        reader = stack.enter_context(SafetensorsReader(file))
        for name in reader.tensors:
            if name in found:
                raise ValueError(f"tensor {name!r} is stored twice, in {found[name].path} and in {file}")
            found[name] = reader
    return found


def _hf_plan(found: dict, model: GPT) -> list:
    """[(stored name, [(minilora Parameter, the columns it takes, or None)])] for every tensor the model takes,
    after checking from the headers alone that the stored tensors are a GPT-2 of the model's architecture, as
    from_hf_state_dict accounts for them: a missing, non-float, misshapen or unknown tensor, or a head of
    another shape than wte, is an error naming it."""
    params = dict(model.named_parameters())
    shapes = hf_tensor_shapes(model.config)
    used, plan = set(), []
    for name, targets in _gpt2_tensors(model.config.n_layer, model.config.n_embd):
        key = next((k for k in (f"transformer.{name}", name) if k in found), None)
        if key is None:
            raise ValueError(f"the GPT-2 checkpoint has no tensor {name!r} (nor 'transformer.{name}')")
        info = found[key].tensors[key]
        if info.dtype.kind != "f":
            raise ValueError(f"the GPT-2 tensor {key!r} has dtype {info.dtype}; expected a float type")
        expected = shapes[name]
        if info.shape != expected:
            raise ValueError(f"{found[key].path}: tensor {key!r} has shape {info.shape}; a GPT-2 of this "
                             f"config.json has {expected}")
        used.add(key)
        plan.append((key, [(params[ours], columns) for ours, columns in targets]))
    wte_key = plan[0][0]
    if "lm_head.weight" in found and \
            found["lm_head.weight"].tensors["lm_head.weight"].shape != found[wte_key].tensors[wte_key].shape:
        raise ValueError(_UNTIED)
    unknown = _unknown_tensors(found, used, model.config.n_layer)
    if unknown is not None:
        raise unknown
    return plan


def _fill_from_hf(found: dict, plan: list) -> None:
    """Read every planned tensor into its parameters: straight from the file into a whole NumPy parameter, or
    through a temporary of the tensor's own size when it is split (c_attn) or the parameters live on the GPU;
    the tensors the model does not take (a tied lm_head, attention-mask buffers) are read a block at a time,
    checked finite and the head compared with wte."""
    for key, targets in plan:
        reader = found[key]
        if len(targets) == 1 and isinstance(targets[0][0].data, numpy.ndarray):
            reader.read_into(key, targets[0][0].data)
            continue
        values = reader.read(key)
        for param, columns in targets:
            part = values if columns is None else values[..., columns]
            with numpy.errstate(over="ignore"):     # an overflow is refused just below
                param.data[...] = backend.asarray(part, dtype=param.data.dtype)
            if not bool(backend.get_array_module(param.data).isfinite(param.data).all()):
                raise ValueError(f"tensor {key!r} of {reader.path} does not fit {param.data.dtype}: some of its "
                                 "values become infinite")
    taken = {key for key, _ in plan}
    wte_key = plan[0][0]
    for key, reader in found.items():
        if key == "lm_head.weight":
            size = reader.block_bytes // 8     # values per block, the same for both whatever their dtypes
            pairs = zip(reader.blocks(key, size), found[wte_key].blocks(wte_key, size))
            if not all(numpy.array_equal(head, wte) for head, wte in pairs):
                raise ValueError(_UNTIED)
        elif key not in taken:
            for _ in reader.blocks(key):   # unused, but a non-finite value is still damage
                pass


def load_hf_gpt2(path, dtype="float32", dropout: float = 0.0) -> GPT:
    """Read a GPT-2 directory (config.json + safetensors), as written by save_hf_gpt2 or transformers.

    Any GPT-2 size; the weights are cast to ``dtype``. dropout: the dropout of the returned model.
    Each tensor goes from the file straight into the model's array (cast a few MB at a time when the dtypes
    differ), so loading holds one copy of the weights, plus one c_attn at a time while it is split.
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
    dtype = backend.resolve_dtype(dtype)
    with ExitStack() as stack:
        found = _open_hf_tensors(path, stack)
        model = GPT._unfilled(config, dtype)
        plan = _hf_plan(found, model)
        for reader in dict.fromkeys(found.values()):
            reader.check_record()
        _fill_from_hf(found, plan)
    return model


# PEFT adapters live in peft_files.py; these names are part of the public interop API
from .peft_files import PEFT_CONFIG_COPY, load_peft_adapter, read_peft_config, save_peft_adapter  # noqa: E402,F401

__all__ = ["PEFT_CONFIG_COPY", "from_hf_state_dict", "hf_config", "load_hf_gpt2", "load_peft_adapter",
           "read_peft_config", "save_hf_gpt2", "save_peft_adapter", "to_hf_state_dict"]
