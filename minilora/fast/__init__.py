"""The fast path: the reference core's functions made faster, with the same signatures and results.

    fast/functional.py   the layer pairs (in-place arithmetic, fused passes, a sorted scatter-add, GPU kernels)
    fast/lora.py         LoRA's two-step pair with in-place adds
    fast/optim.py        AdamW's update in place, or as one GPU kernel
    fast/parallel.py     data parallelism over the CPU's cores (train.fit uses it when threads > 1)
    fast/kernels.py      the CuPy kernels and their per-element formulas
    fast/allocator.py    an opt-in, process-wide allocator setting (the CLI and the benchmark make it)

Importing this package registers each function below as the fast version of its reference (checked to take
the same parameters); ``backend.use_fast(False)`` or ``MINILORA_FAST=0`` runs the reference instead.
tests/test_fast.py compares every pair here with its reference on random shapes and edge cases.
"""
from ..core import backend
from ..core import functional as reference_functional
from ..core import lora as reference_lora
from ..core import optim as reference_optim
from . import functional, lora, optim

REPLACES = {
    reference_functional: {
        "linear_forward": functional.linear_forward,
        "linear_backward": functional.linear_backward,
        "embedding_backward": functional.embedding_backward,
        "layernorm_forward": functional.layernorm_forward,
        "layernorm_backward": functional.layernorm_backward,
        "gelu_forward": functional.gelu_forward,
        "gelu_backward": functional.gelu_backward,
        "attention_forward": functional.attention_forward,
        "attention_backward": functional.attention_backward,
        "softmax_cross_entropy": functional.softmax_cross_entropy,
    },
    reference_lora: {
        "lora_forward": lora.lora_forward,
        "lora_backward": lora.lora_backward,
    },
    reference_optim: {
        "adamw_update": optim.adamw_update,
    },
}

for _reference, _functions in REPLACES.items():
    backend.register_fast(_reference, _functions)
