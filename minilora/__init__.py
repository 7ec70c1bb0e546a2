"""minilora: LoRA from scratch on a tiny GPT-2 whose every backward pass is written by hand (NumPy/CuPy).

    import minilora as ml
    model = ml.load_pretrained()                      # the shipped tiny GPT, offline
    ml.apply_lora(model, ml.LoRAConfig(r=4, alpha=8)) # adapters on Wq and Wv; everything else frozen
    logits = model.forward(idx)                       # idx (B, T) -> logits (B, T, V)
    loss, dlogits = ml.cross_entropy(logits, targets)
    model.backward(dlogits)                           # fills p.grad for every trainable parameter
"""
from . import (adapters, backend, data, files, functional, gradcheck, interop, lora, methods, nn, optim, prefix,
               tasks, tokenizer, train)
from .adapters import AdapterConfig, apply_adapters
from .backend import asarray, current_backend, to_numpy, use_backend
from .lora import (LoRAConfig, apply_lora, disable_lora, load_lora, merge_lora, parameter_report, save_lora,
                   unmerge_lora)
from .methods import METHODS, MethodSettings, apply_bitfit, apply_method
from .model import GPT, GPTConfig, cross_entropy
from .nn import Module, Parameter
from .optim import SGD, AdamW, clip_grad_norm, cosine_schedule
from .prefix import PrefixConfig, PromptConfig, apply_prefix, apply_prompt, bake_prefix
from .pretrained import load_pretrained, pretrained_info

__version__ = "0.1.0"

__all__ = [
    "adapters", "backend", "data", "files", "functional", "gradcheck", "interop", "lora", "methods", "nn", "optim",
    "prefix", "tasks", "tokenizer", "train",
    "AdapterConfig", "apply_adapters", "METHODS", "MethodSettings", "apply_bitfit", "apply_method",
    "PrefixConfig", "PromptConfig", "apply_prefix", "apply_prompt", "bake_prefix",
    "asarray", "current_backend", "to_numpy", "use_backend",
    "LoRAConfig", "apply_lora", "disable_lora", "load_lora", "merge_lora", "parameter_report", "save_lora",
    "unmerge_lora",
    "GPT", "GPTConfig", "cross_entropy", "Module", "Parameter",
    "SGD", "AdamW", "clip_grad_norm", "cosine_schedule", "load_pretrained", "pretrained_info",
]
