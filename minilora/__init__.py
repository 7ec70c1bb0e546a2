"""minilora: LoRA from scratch on a tiny GPT-2 whose every backward pass is written by hand (NumPy/CuPy).

    import minilora as ml
    model = ml.GPT(ml.GPTConfig(), seed=0)
    logits = model.forward(idx)                       # idx (B, T) -> logits (B, T, V)
    loss, dlogits = ml.cross_entropy(logits, targets)
    model.backward(dlogits)                           # fills p.grad for every trainable parameter
"""
from . import backend, functional, gradcheck, interop, nn, optim
from .backend import asarray, current_backend, to_numpy, use_backend
from .model import GPT, GPTConfig, cross_entropy
from .nn import Module, Parameter
from .optim import SGD, AdamW, clip_grad_norm, cosine_schedule

__version__ = "0.1.0"

__all__ = [
    "backend", "functional", "gradcheck", "interop", "nn", "optim",
    "asarray", "current_backend", "to_numpy", "use_backend",
    "GPT", "GPTConfig", "cross_entropy", "Module", "Parameter",
    "SGD", "AdamW", "clip_grad_norm", "cosine_schedule",
]
