"""minilora: LoRA from scratch on a tiny GPT-2 whose every backward pass is written by hand (NumPy/CuPy).

    import minilora as ml
    model = ml.load_pretrained()                      # the shipped tiny GPT, offline
    ml.apply_lora(model, ml.LoRAConfig(r=4, alpha=8)) # adapters on Wq and Wv; everything else frozen
    logits = model.forward(idx)                       # idx (B, T) -> logits (B, T, V)
    loss, dlogits = ml.cross_entropy(logits, targets)
    model.backward(dlogits)                           # fills p.grad for every trainable parameter

The code, in reading order (each part depends only on the ones before it):
    core/         the reference: backend, functional (the forward/backward pairs), nn, model, optim, lora,
                  adapters, prefix, methods, intrinsic, gradcheck: the math as the derivation reads
    fast/         the same pairs made faster (and data parallelism, CuPy kernels), tested equal to core;
                  on by default, off with MINILORA_FAST=0 or ``with ml.use_fast(False): ...``
    io/           safetensors files, checkpoints, Hugging Face GPT-2 and PEFT formats, the shipped model
    data, tokenizer, train, tasks, finetune     corpora, the training loop, the fine-tune recipe
    experiments/, plots, tour, bench            studies, figures, the main job, the benchmark
    course/       assignments, the student-version builder, the grader
    cli           the ``minilora`` command
"""
import importlib
import sys

from .core import adapters, backend, dora, functional, gradcheck, intrinsic, lora, loraplus, methods, model, nn, optim
from .core import prefix, quant, vera
from .core.backend import fast_enabled, use_fast
from . import fast
from .io import checkpoints, files, interop, pretrained
from . import data, tasks, tokenizer, train
from . import course
from .fast import parallel
from .core.adapters import AdapterConfig, apply_adapters
from .core.backend import asarray, current_backend, to_numpy, use_backend
from .core.lora import (LoRAConfig, apply_lora, disable_lora, merge_lora, parameter_report, unmerge_lora)
from .io.adapter_files import load_lora, save_lora
from .io.vera_files import load_vera, save_vera
from .core.quant import NF4Config, dequantize_base, quantize_base
from .core.vera import VeRAConfig, apply_vera
from .core.methods import METHODS, MethodSettings, apply_bitfit, apply_method
from .core.model import GPT, GPTConfig, cross_entropy
from .core.nn import Module, Parameter
from .core.optim import SGD, AdamW, clip_grad_norm, cosine_schedule
from .core.prefix import PrefixConfig, PromptConfig, apply_prefix, apply_prompt, bake_prefix
from .io.pretrained import load_pretrained, pretrained_info

__version__ = "0.1.0"

# Flat import paths beside the subpackages: each short name is the same module object as its home in core/,
# fast/, io/ or course/ (not a copy), so ``import minilora.functional`` and
# ``from minilora.assignments import grade`` work, and patching either name patches both.
MOVED_MODULES = {
    "adapters": "core.adapters", "backend": "core.backend", "functional": "core.functional",
    "gradcheck": "core.gradcheck", "intrinsic": "core.intrinsic", "lora": "core.lora", "methods": "core.methods",
    "model": "core.model", "nn": "core.nn", "optim": "core.optim", "prefix": "core.prefix",
    "dora": "core.dora", "vera": "core.vera", "loraplus": "core.loraplus", "quant": "core.quant",
    "files": "io.files", "interop": "io.interop", "pretrained": "io.pretrained", "parallel": "fast.parallel",
    "assignments": "course", "assignments.build": "course.build", "assignments.cli": "course.cli",
    "assignments.grade": "course.grade", "assignments.sources": "course.sources",
}
for _old_name, _new_name in MOVED_MODULES.items():
    sys.modules[f"{__name__}.{_old_name}"] = importlib.import_module(f"{__name__}.{_new_name}")
assignments = course

__all__ = [
    "adapters", "backend", "data", "files", "functional", "gradcheck", "interop", "lora", "methods", "nn", "optim",
    "prefix", "tasks", "tokenizer", "train", "fast", "use_fast", "fast_enabled",
    "AdapterConfig", "apply_adapters", "METHODS", "MethodSettings", "apply_bitfit", "apply_method",
    "PrefixConfig", "PromptConfig", "apply_prefix", "apply_prompt", "bake_prefix",
    "asarray", "current_backend", "to_numpy", "use_backend",
    "LoRAConfig", "apply_lora", "disable_lora", "load_lora", "merge_lora", "parameter_report", "save_lora",
    "unmerge_lora", "dora", "vera", "loraplus", "quant", "VeRAConfig", "apply_vera", "load_vera", "save_vera",
    "NF4Config", "quantize_base", "dequantize_base",
    "GPT", "GPTConfig", "cross_entropy", "Module", "Parameter",
    "SGD", "AdamW", "clip_grad_norm", "cosine_schedule", "load_pretrained", "pretrained_info",
]
