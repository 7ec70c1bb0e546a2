"""VeRA adapter files: minilora's own (``save_vera`` / ``load_vera``) and PEFT's (``save_peft_vera`` /
``load_peft_vera``).

minilora's files. ``vera_adapter.safetensors`` holds every layer's lambda_d and lambda_b; its header seals the
configuration (the VeRAConfig, the adapted modules, the shape of the shared pair and a sha256 of it, the base
model's config and fingerprint). The pair itself is not stored when it is the one its seed draws: loading draws
it again and checks the sha256, so the file stays as small as the vectors. A pair that came from elsewhere (a
PEFT file) is stored in the file as vera_A, vera_B. ``vera_adapter_config.json`` is a readable copy, checked
against the sealed one as ``adapter_files`` does for LoRA.

PEFT's files. PEFT draws its pair with torch's generator, which minilora cannot reproduce, so its files are
written and read with the pair in them (``save_projection=True``; a file without it is refused). PEFT names the
tensors ``base_model.vera_A`` (r, in_max), ``base_model.vera_B`` (out_max, r) and
``base_model.model.<HF module>.vera_lambda_d`` / ``.vera_lambda_b``, and sizes the pair to the largest input and
output over its own targets.

GPT-2 fuses q, k and v into one c_attn (C -> 3C), whose PEFT VeRA layer has ONE lambda_d for the three and
slices B's rows [:3C], while minilora's q, k and v layers each have their own lambda_d and slice B's rows [:C].
Export is still exact, by giving each kind of layer a block of columns of its own in a pair of rank r' = n r
(n blocks: one for the unfused layers, one for each of q, k, v that is adapted):

    A' = [A; A; ...]                         (n r, in_max)    every block sees the same random down-projection
    B'[:, unfused block] = B[:out_max]      the unfused layers (attn.c_proj, mlp.c_fc, mlp.c_proj) slice it as before
    B'[j C:(j + 1) C, block of q/k/v j] = B[:C], zero elsewhere in that block
    lambda_d' = lambda_d in the layer's own block, 0 elsewhere
    c_attn's lambda_b' = [lambda_b_q | lambda_b_k | lambda_b_v]   (0 for a third that is not adapted)

so every output of every layer gets exactly minilora's update (the other blocks add exact zeros). The reverse
is not possible in general: a c_attn layer trained in PEFT mixes its random directions over q, k and v. Loading
takes c_attn back only from a file save_peft_vera wrote (its header records r and the blocks, and every part of
the block structure is checked exactly), and refuses it otherwise; the unfused modules map one to one:

    minilora             PEFT (GPT-2)
    h.{i}.attn.o_proj    transformer.h.{i}.attn.c_proj
    h.{i}.mlp.fc         transformer.h.{i}.mlp.c_fc
    h.{i}.mlp.proj       transformer.h.{i}.mlp.c_proj
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy

from ..core import backend
from ..core.lora import _matches, linear_modules, lora_modules
from ..core.nn import Module
from ..core.vera import VeRAConfig, apply_vera, projection, projection_shape, vera_modules
from .adapter_files import base_fingerprint, read_sealed
from .files import load_safetensors, save_safetensors, write_json

VERA_WEIGHTS = "vera_adapter.safetensors"
VERA_CONFIG = "vera_adapter_config.json"

# ----------------------------------------------------------------------------------------------------
# minilora's own files


def projection_sha256(A, B) -> str:
    """sha256 of a pair (shapes and float64 bytes): of the seed's float64 draw when the file does not store the
    pair (does this NumPy draw the same numbers?), of the stored tensors otherwise."""
    digest = hashlib.sha256()
    for array in (A, B):
        host = numpy.ascontiguousarray(backend.to_numpy(array).astype(numpy.float64))
        digest.update(json.dumps(list(host.shape)).encode())
        digest.update(host.tobytes())
    return digest.hexdigest()


def _vera_layers(model: Module, action: str):
    layers = vera_modules(model)
    if not layers:
        raise ValueError(f"the model has no VeRA layers to {action}")
    if len(layers) != len(lora_modules(model)):
        raise ValueError(f"the model mixes VeRA with LoRA layers; {action} handles VeRA-only models")
    if any(m.merged for _, m in layers):
        raise ValueError(f"the VeRA layers are merged into the weights: unmerge_lora(model) before you {action} them")
    return layers


def _drawn_pair(config: VeRAConfig, shape_A, shape_B):
    """The pair config's seed draws for these shapes, float64 on the host (apply_vera casts it to the model's dtype)."""
    return projection(config.r, shape_A[1], shape_B[0], config.projection_seed)


def _holds(model, A, B) -> bool:
    """Whether the model's pair is exactly (A, B) cast to its dtype."""
    ours_A, ours_B = backend.to_numpy(model.vera_A.data), backend.to_numpy(model.vera_B.data)
    return ours_A.shape == A.shape and ours_B.shape == B.shape and \
        numpy.array_equal(A.astype(ours_A.dtype), ours_A) and numpy.array_equal(B.astype(ours_B.dtype), ours_B)


def vera_state(model: Module) -> tuple[dict, dict]:
    """(tensors, configuration) of a VeRA adapter file: every lambda_d, lambda_b (and the pair when its seed does
    not draw it), and what load_vera needs to rebuild and check the rest."""
    layers = _vera_layers(model, "save")
    config = getattr(model, "vera_config", None)
    if not isinstance(config, VeRAConfig):
        raise ValueError("the model has VeRA layers but no vera_config (apply_vera sets it)")
    A, B = model.vera_A.data, model.vera_B.data
    tensors = {}
    for name, m in layers:
        tensors[f"{name}.vera_lambda_d"], tensors[f"{name}.vera_lambda_b"] = m.vera_lambda_d.data, m.vera_lambda_b.data
    drawn_A, drawn_B = _drawn_pair(config, A.shape, B.shape)
    stored = not _holds(model, drawn_A, drawn_B)
    if stored:
        tensors["vera_A"], tensors["vera_B"] = A, B
    record = projection_sha256(A, B) if stored else projection_sha256(drawn_A, drawn_B)
    meta = {"method": "vera", "vera_config": config.to_dict(), "modules": [name for name, _ in layers],
            "projection": {"shape_A": list(A.shape), "shape_B": list(B.shape), "sha256": record, "stored": stored},
            "base_fingerprint": base_fingerprint(model)}
    if hasattr(model, "config"):
        meta["base_model_config"] = model.config.to_dict()
    return tensors, meta


def save_vera(model: Module, directory) -> Path:
    """Write the VeRA adapter only: ``vera_adapter.safetensors`` (the vectors, the configuration sealed in its
    header) and ``vera_adapter_config.json`` (a readable copy)."""
    directory = Path(directory)
    tensors, meta = vera_state(model)
    write_json(directory / VERA_CONFIG, meta)
    save_safetensors(tensors, directory / VERA_WEIGHTS, metadata={"format": "pt", "minilora": json.dumps(meta)})
    return directory


def read_vera(directory) -> tuple[dict, dict]:
    """(tensors, configuration) of a saved VeRA adapter: the integrity record, no NaN or inf, and the readable
    copy equal to the sealed configuration."""
    directory = Path(directory)
    tensors, meta = read_sealed(directory, VERA_WEIGHTS, VERA_CONFIG)
    if meta.get("method") != "vera" or "vera_config" not in meta:
        raise ValueError(f"{directory / VERA_WEIGHTS} is not a VeRA adapter (method {meta.get('method')!r})")
    return tensors, meta


def load_vera(model: Module, directory, seed: int = 0, force: bool = False) -> Module:
    """Apply the saved VeRA adapter to ``model`` (a base model, or one with the same unmerged VeRA layers and pair)
    and load it. Everything is checked before the model changes (files, configuration, modules, shapes, the pair's
    sha256, the base model's config and fingerprint; force=True accepts other base weights, as load_lora)."""
    directory = Path(directory)
    tensors, meta = read_vera(directory)
    where = directory / VERA_WEIGHTS
    try:
        config = VeRAConfig(**{**meta["vera_config"], "targets": tuple(meta["vera_config"]["targets"])})
        modules, proj = list(meta["modules"]), meta["projection"]
        shape_A, shape_B, recorded_pair = tuple(proj["shape_A"]), tuple(proj["shape_B"]), proj["sha256"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where} has no valid VeRA configuration: {exc}") from exc
    base_config = meta.get("base_model_config")
    if base_config is not None and hasattr(model, "config") and base_config != model.config.to_dict():
        raise ValueError(f"the adapter was trained on a model with config {base_config}; this model has "
                         f"{model.config.to_dict()}")
    existing = dict(vera_modules(model))
    if lora_modules(model) and not existing:
        raise ValueError("the model has LoRA layers; load a VeRA adapter into a base model")
    if any(m.merged for m in existing.values()):
        raise ValueError("the model's VeRA layers are merged: unmerge_lora(model) first")
    linears = {name: lin for name, _, _, lin in linear_modules(model)}
    missing = [n for n in modules if n not in linears]
    if missing:
        raise ValueError(f"the adapter in {directory} targets modules this model does not have: {missing}")
    chosen = [name for name in linears if _matches(name, config.targets)]
    if (sorted(existing) if existing else sorted(chosen)) != sorted(modules):
        raise ValueError(f"the adapter in {directory} holds modules {modules}; on this model its targets "
                         f"{list(config.targets)} give {sorted(existing) if existing else sorted(chosen)}")
    if existing and getattr(model, "vera_config", None) != config:
        raise ValueError(f"the model's VeRA layers were made with {getattr(model, 'vera_config', None)}; the adapter "
                         f"in {directory} with {config}")
    in_max, out_max = projection_shape(model, config) if not existing else (model.vera_A.shape[1],
                                                                             model.vera_B.shape[0])
    if shape_A != (config.r, in_max) or shape_B != (out_max, config.r):
        raise ValueError(f"the adapter's shared pair is A {shape_A}, B {shape_B}; this model needs A "
                         f"{(config.r, in_max)}, B {(out_max, config.r)}")
    expected = {}
    for n in modules:
        expected[f"{n}.vera_lambda_d"] = (config.r,)
        expected[f"{n}.vera_lambda_b"] = (linears[n].weight.shape[1],)
    if proj.get("stored"):
        expected["vera_A"], expected["vera_B"] = shape_A, shape_B
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"{k} has shape {tuple(tensors[k].shape)}, the model needs {s}" for k, s in expected.items()
                 if k in tensors and tuple(tensors[k].shape) != s]
    extra = sorted(set(tensors) - set(expected))
    if extra:
        problems.append(f"unexpected tensors {extra}")
    if problems:
        raise ValueError(f"the adapter in {directory} does not fit this model: " + "; ".join(problems))
    dtype = linears[modules[0]].weight.data.dtype
    if proj.get("stored"):
        A, B = tensors["vera_A"], tensors["vera_B"]
    else:
        A, B = _drawn_pair(config, shape_A, shape_B)
    if projection_sha256(A, B) != recorded_pair:
        raise ValueError(f"the shared pair {'stored in' if proj.get('stored') else 'drawn again for'} {where} "
                         f"(seed {config.projection_seed}) differs from the one the adapter was trained with (sha256 "
                         f"{recorded_pair[:12]})")
    if existing and not _holds(model, A, B):
        raise ValueError(f"the model's shared pair differs from the one the adapter in {directory} was trained with")
    recorded = meta.get("base_fingerprint")
    if recorded is not None and not force:
        actual = base_fingerprint(model, modules)
        if actual != recorded:
            raise ValueError(f"the adapter in {directory} was trained on other base weights (fingerprint "
                             f"{recorded[:12]}, this model {actual[:12]}): its update was learnt for those; "
                             "load_vera(..., force=True) loads it anyway")
    if not existing:
        apply_vera(model, config, seed=seed)
    model.vera_A.data[...] = backend.asarray(A, dtype=dtype)
    model.vera_B.data[...] = backend.asarray(B, dtype=dtype)
    params = dict(model.named_parameters())
    for key in expected:
        if key not in ("vera_A", "vera_B"):
            params[key].data[...] = backend.asarray(tensors[key], dtype=params[key].data.dtype)
    return model


# ----------------------------------------------------------------------------------------------------
# PEFT's files

PEFT_PAIR = ("base_model.vera_A", "base_model.vera_B")
VERA_LAYOUT = "minilora_vera_blocks"     # header key: minilora's r and the column blocks of an exported pair
_ROLES = ("unfused", "q_proj", "k_proj", "v_proj")      # the column blocks of an exported pair, in this order


def save_peft_vera(model: Module, path) -> Path:
    """Write the model's VeRA layers as a PEFT VeRA adapter (``save_projection=True``) for the GPT-2 written by
    ``interop.save_hf_gpt2(model, ...)``; ``peft.PeftModel.from_pretrained`` then gives the same logits."""
    from .peft_files import PEFT_CONFIG_COPY, _PEFT_PREFIX, _hf_module_name

    layers = _vera_layers(model, "export")
    config = model.vera_config
    C = model.config.n_embd
    groups = {}          # HF module -> [(q/k/v or None, VeRALinear)]
    for name, m in layers:
        hf_name, third = _hf_module_name(name)
        groups.setdefault(hf_name, []).append((third, m))
    used = {third or "unfused" for parts in groups.values() for third, _ in parts}
    blocks = [role for role in _ROLES if role in used]
    r, n = config.r, len(blocks)
    A, B = backend.to_numpy(model.vera_A.data), backend.to_numpy(model.vera_B.data)
    unfused_out = max([m.out_features for parts in groups.values() for third, m in parts if third is None], default=0)
    out_rows = max(unfused_out, 3 * C if any(third for parts in groups.values() for third, _ in parts) else 0)
    A_peft = numpy.concatenate([A] * n, axis=0)                                   # (n r, in_max)
    B_peft = numpy.zeros((out_rows, n * r), dtype=B.dtype)                        # (out_max', n r)
    for k, role in enumerate(blocks):
        cols = slice(k * r, (k + 1) * r)
        if role == "unfused":
            B_peft[:unfused_out, cols] = B[:unfused_out]
        else:
            j = _ROLES.index(role) - 1
            B_peft[j * C:(j + 1) * C, cols] = B[:C]
    tensors = {PEFT_PAIR[0]: A_peft, PEFT_PAIR[1]: B_peft}
    for hf_name, parts in groups.items():
        lambda_d = numpy.zeros(n * r, dtype=A.dtype)
        fused = parts[0][0] is not None
        lambda_b = numpy.zeros(3 * C if fused else parts[0][1].out_features, dtype=A.dtype)
        for third, m in parts:
            k = blocks.index(third or "unfused")
            lambda_d[k * r:(k + 1) * r] = backend.to_numpy(m.vera_lambda_d.data)
            j = ("q_proj", "k_proj", "v_proj").index(third) if fused else 0
            lambda_b[j * C:j * C + m.out_features] = backend.to_numpy(m.vera_lambda_b.data)
        tensors[f"{_PEFT_PREFIX}{hf_name}.vera_lambda_d"] = lambda_d
        tensors[f"{_PEFT_PREFIX}{hf_name}.vera_lambda_b"] = lambda_b
    adapter_config = {
        "peft_type": "VERA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": n * r,
        "target_modules": sorted(groups), "projection_prng_key": config.projection_seed, "save_projection": True,
        "vera_dropout": config.dropout, "d_initial": config.d_initial, "fan_in_fan_out": True, "bias": "none",
        "init_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "inference_mode": True,
    }
    path = Path(path)
    write_json(path / "adapter_config.json", adapter_config)
    save_safetensors(tensors, path / "adapter_model.safetensors",
                     metadata={"format": "pt", PEFT_CONFIG_COPY: json.dumps(adapter_config, sort_keys=True),
                               VERA_LAYOUT: json.dumps({"r": r, "blocks": blocks})})
    return path


def _unblock(weights, layout, r_file, A, B, unfused, fused, model):
    """minilora's (r, {module: (lambda_d, lambda_b)}, A, B) from a pair exported in column blocks (see the module's
    docstring), each part of that structure checked exactly: a file PEFT trained further mixes the blocks and is
    refused."""
    try:
        r, blocks = int(layout["r"]), list(layout["blocks"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{weights}: its {VERA_LAYOUT} header entry is not minilora's ({exc})") from None
    if not blocks or any(b not in _ROLES for b in blocks) or len(set(blocks)) != len(blocks) or r < 1 \
            or r * len(blocks) != r_file:
        raise ValueError(f"{weights}: its {VERA_LAYOUT} header entry {layout} does not describe a pair of rank "
                         f"{r_file}")
    C = model.config.n_embd

    def segment(role):
        k = blocks.index(role)
        return slice(k * r, (k + 1) * r)

    def refuse(what):
        raise ValueError(f"{weights}: {what}, so the pair no longer has the blocks save_peft_vera wrote (was the "
                         "adapter trained further in PEFT?); it cannot be loaded exactly into separate q, k, v layers")

    A_ours = A[:r]
    if any(not numpy.array_equal(A[segment(role)], A_ours) for role in blocks):
        refuse("the blocks of vera_A differ")
    plan = {}
    for name, (lambda_d, lambda_b) in unfused.items():
        if "unfused" not in blocks or lambda_d.shape != (r_file,):
            refuse(f"{name}'s lambda_d {lambda_d.shape} has no block of its own")
        rest = lambda_d.copy()
        rest[segment("unfused")] = 0
        if numpy.any(rest):
            refuse(f"{name}'s lambda_d is non-zero outside its block")
        plan[name] = (lambda_d[segment("unfused")], lambda_b)
    roles = [role for role in blocks if role != "unfused"]
    for block, (lambda_d, lambda_b) in fused.items():
        if lambda_d.shape != (r_file,) or lambda_b.shape != (3 * C,):
            refuse(f"{block}'s c_attn has lambda_d {lambda_d.shape}, lambda_b {lambda_b.shape}")
        if "unfused" in blocks and numpy.any(lambda_d[segment("unfused")]):
            refuse(f"{block}'s c_attn uses the unfused layers' block")
        for role in roles:
            j = ("q_proj", "k_proj", "v_proj").index(role)
            plan[f"{block}.attn.{role}"] = (lambda_d[segment(role)], lambda_b[j * C:(j + 1) * C])
    in_max, out_max = projection_shape(model, VeRAConfig(r=r, targets=tuple(sorted(plan))))
    if "unfused" in blocks:
        if B.shape[0] < out_max:
            refuse(f"vera_B has {B.shape[0]} rows, fewer than the {out_max} the layers need")
        B_ours = B[:out_max, segment("unfused")]
    else:
        j = ("q_proj", "k_proj", "v_proj").index(roles[0])
        B_ours = B[j * C:(j + 1) * C, segment(roles[0])]
    for role in roles:
        j = ("q_proj", "k_proj", "v_proj").index(role)
        column = B[:, segment(role)].copy()
        if B.shape[0] < 3 * C or not numpy.array_equal(column[j * C:(j + 1) * C], B_ours[:C]):
            refuse(f"vera_B's block of {role} is not the shared B's first {C} rows")
        column[j * C:(j + 1) * C] = 0
        if numpy.any(column):
            refuse(f"vera_B's block of {role} is non-zero outside rows of {role}")
    if A_ours.shape[1] != in_max:
        refuse(f"vera_A has {A_ours.shape[1]} columns; the layers need {in_max}")
    return r, plan, A_ours, B_ours


# every field of PEFT's VeraConfig: r, the pair's seed, dropout and d_initial are applied; bias and modules_to_save
# must be off (checked below); the rest describe the adapter or act only when PEFT creates one
PEFT_VERA_FIELDS = {"auto_mapping", "base_model_name_or_path", "bias", "d_initial", "fan_in_fan_out", "inference_mode",
                    "init_weights", "layers_pattern", "layers_to_transform", "modules_to_save", "peft_type",
                    "peft_version", "projection_prng_key", "r", "revision", "save_projection", "target_modules",
                    "task_type", "vera_dropout"}


def load_peft_vera(model: Module, path) -> Module:
    """Apply a PEFT VeRA adapter saved for a GPT-2 model (with its pair: save_projection=True) to a minilora GPT
    without adapters (in place). Refused: a c_attn layer (see the module's docstring), a file without the pair."""
    from .peft_files import PEFT_CONFIG_COPY, _HF_LORA_NAMES, _PEFT_PREFIX

    path = Path(path)
    if lora_modules(model):
        raise ValueError("the model already has LoRA or VeRA layers; load a PEFT adapter into a base model")
    from .peft_files import read_peft_config

    config = read_peft_config(path / "adapter_config.json")
    if config.get("peft_type") != "VERA":
        raise ValueError(f"{path} holds a {config.get('peft_type')} adapter, not VERA")
    unknown = sorted(set(config) - PEFT_VERA_FIELDS)
    if unknown:
        raise ValueError(f"{path / 'adapter_config.json'}: the fields {unknown} are not ones minilora's VeRA loader "
                         f"knows (PEFT VeraConfig fields: {sorted(PEFT_VERA_FIELDS)}); refusing to guess what they do")
    if "r" not in config:
        raise ValueError(f"{path / 'adapter_config.json'} lacks r: a PEFT VeRA config always has it")
    if not config.get("save_projection", True):
        raise ValueError(f"{path}: save_projection=false: the shared pair vera_A, vera_B is not in the file, and PEFT "
                         "draws it with torch's generator, which minilora cannot reproduce; save the adapter in PEFT "
                         "with save_projection=True")
    for key, ok in (("bias", "none"), ("modules_to_save", None)):
        if config.get(key, ok) != ok:
            raise ValueError(f"{path}: {key}={config.get(key)!r} is not supported (expected {ok!r})")
    weights = path / "adapter_model.safetensors"
    tensors, header = load_safetensors(weights)
    if PEFT_CONFIG_COPY in header and json.loads(header[PEFT_CONFIG_COPY]) != config:
        raise ValueError(f"{path / 'adapter_config.json'} does not match the config minilora wrote with {weights}: "
                         "it was edited, or a save was interrupted")
    missing_pair = [k for k in PEFT_PAIR if k not in tensors]
    if missing_pair:
        raise ValueError(f"{weights} lacks {missing_pair}: a VeRA file without its shared pair cannot be loaded "
                         "(PEFT draws it with torch's generator); save it with save_projection=True")
    suffixes = (".vera_lambda_d", ".vera_lambda_b")
    unknown = sorted(k for k in tensors if k not in PEFT_PAIR and not k.endswith(suffixes))
    if unknown:
        raise ValueError(f"{weights} holds tensors minilora cannot apply: {unknown}")
    r_file = config["r"]
    if not isinstance(r_file, int) or isinstance(r_file, bool) or r_file < 1:
        raise ValueError(f"{path / 'adapter_config.json'}: r must be an int >= 1; got {r_file!r}")
    A, B = tensors[PEFT_PAIR[0]], tensors[PEFT_PAIR[1]]
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r_file or B.shape[1] != r_file:
        raise ValueError(f"{weights}: vera_A {A.shape}, vera_B {B.shape} do not have rank r={r_file} "
                         "(A (r, in), B (out, r))")
    layout = json.loads(header[VERA_LAYOUT]) if VERA_LAYOUT in header else None
    modules = dict(model.named_modules())
    unfused = {}     # our module name -> (lambda_d, lambda_b)
    fused = {}       # block ("h.0") -> its c_attn's (lambda_d, lambda_b)
    for key in sorted(k for k in tensors if k.endswith(".vera_lambda_d")):
        hf_name = key[:-len(".vera_lambda_d")]
        hf_name = hf_name[len(_PEFT_PREFIX):] if hf_name.startswith(_PEFT_PREFIX) else hf_name
        other = key[:-1] + "b"                                   # vera_lambda_d -> vera_lambda_b
        if other not in tensors:
            raise ValueError(f"{weights}: {key} has no matching vera_lambda_b")
        short = hf_name[len("transformer."):] if hf_name.startswith("transformer.") else hf_name
        if short.endswith(".attn.c_attn"):
            if layout is None:
                raise ValueError(f"{weights}: {hf_name} is GPT-2's fused q, k, v projection, whose VeRA layer shares "
                                 "one lambda_d across q, k and v and slices rows [C:3C] of vera_B for k and v; "
                                 "minilora's separate q, k, v layers each slice rows [:C], so it cannot be loaded "
                                 "exactly (only a file written by save_peft_vera, which keeps q, k and v in column "
                                 "blocks of their own, can). Adapt attn.c_proj, mlp.c_fc or mlp.c_proj")
            fused[short[:-len(".attn.c_attn")]] = (tensors[key], tensors[other])
            continue
        ours = next((short[:-len(theirs)] + o for o, theirs in _HF_LORA_NAMES.items() if short.endswith(theirs)), None)
        if ours is None or ours not in modules:
            raise ValueError(f"{weights}: no minilora module corresponds to {hf_name!r}")
        unfused[ours] = (tensors[key], tensors[other])
    orphans = sorted(k for k in tensors if k.endswith(".vera_lambda_b") and k[:-1] + "d" not in tensors)
    if orphans:
        raise ValueError(f"{weights}: {orphans} have no matching vera_lambda_d")
    if not unfused and not fused:
        raise ValueError(f"{weights}: the adapter holds no vera_lambda_d / vera_lambda_b tensors")
    if layout is None:
        r, plan = r_file, unfused
    else:
        r, plan, A, B = _unblock(weights, layout, r_file, A, B, unfused, fused, model)
    for name, (lambda_d, lambda_b) in plan.items():
        if name not in modules:
            raise ValueError(f"{weights}: the adapter targets {name!r}, which this model does not have")
        W = modules[name].weight
        if lambda_d.shape != (r,) or lambda_b.shape != (W.shape[1],):
            raise ValueError(f"{weights}: the adapter for {name} has lambda_d {lambda_d.shape}, lambda_b "
                             f"{lambda_b.shape}; W is {tuple(W.shape)}, r={r}")
    try:
        vera_config = VeRAConfig(r=r, targets=tuple(sorted(plan)), d_initial=config.get("d_initial", 0.1),
                                 dropout=config.get("vera_dropout", 0.0),
                                 projection_seed=config.get("projection_prng_key", 0))
    except ValueError as exc:
        raise ValueError(f"{path / 'adapter_config.json'}: {exc}") from None
    in_max, out_max = projection_shape(model, vera_config)
    if A.shape[1] != in_max or B.shape[0] != out_max:
        raise ValueError(f"{weights}: vera_A {A.shape}, vera_B {B.shape} were sized to PEFT's targets; minilora's "
                         f"layers {sorted(plan)} slice a pair of A {(r, in_max)}, B {(out_max, r)}: the same targets "
                         "must give the same largest input and output")
    apply_vera(model, vera_config)
    dtype = model.vera_A.data.dtype
    model.vera_A.data[...] = backend.asarray(A, dtype=dtype)
    model.vera_B.data[...] = backend.asarray(B, dtype=dtype)
    layers = dict(vera_modules(model))
    for name, (lambda_d, lambda_b) in plan.items():
        layer = layers[name]
        layer.vera_lambda_d.data[...] = backend.asarray(lambda_d, dtype=dtype)
        layer.vera_lambda_b.data[...] = backend.asarray(lambda_b, dtype=dtype)
    return model
