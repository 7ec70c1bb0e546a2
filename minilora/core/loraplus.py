"""LoRA+ (Hayou et al. 2024): train B with a larger learning rate than A, eta_B = lambda * eta_A.

    y = x W + s (x A^T) B^T         A: (r, in) starts random,  B: (out, r) starts at zero

LoRA's two factors play different roles: A maps the input to r features, B maps those features to the output
and starts at zero. The paper's analysis as the width n grows: with one learning rate for both, the largest rate
that keeps training stable is too small for B to learn its part efficiently, and fine-tuning is slow; giving B a
rate lambda times A's (lambda > 1, growing with the width) lets both learn efficiently. It recommends
lambda = 2^4 = 16 as a default.

Nothing in the model changes (the forward and backward are LoRA's): LoRA+ is two parameter groups of the
optimizer. ``loraplus_groups(model, ratio)`` gives them; ``optimizer_groups(model)`` is what the training loop
(``train.fit``) hands its AdamW, so a model whose ``lora_config.loraplus_ratio`` is set trains as LoRA+.

The groups' rates are relative (``core/optim.py``): the schedule sets one ``lr`` (eta_A) and group B steps with
lr * lambda at every step, through warmup and decay alike.

PEFT's ``create_loraplus_optimizer`` splits differently in two places: LoRA on embedding layers goes into a third
group with its own absolute rate (``loraplus_lr_embedding``, 1e-6 by default), and every trainable 1-D parameter
(a bias or a LayerNorm weight) goes with B at lambda times the rate. minilora adapts Linear layers only (no
embedding group is needed), and keeps everything except lora_B at eta_A, as the paper's A/B analysis says.
"""
from __future__ import annotations

from .lora import lora_modules
from .nn import Module


def _check_ratio(ratio) -> float:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < float("inf"):
        raise ValueError(f"the LoRA+ ratio lambda = eta_B / eta_A must be a finite number > 0; got {ratio!r}")
    return float(ratio)


def loraplus_groups(model: Module, ratio: float) -> list:
    """The two parameter groups of LoRA+: [{"params": every trainable parameter but lora_B},
    {"params": the lora_B of every LoRA layer, "lr_ratio": ratio}] (for ``AdamW(groups, lr=eta_A)``).

    A model without LoRA layers is a ValueError: LoRA+ has no B to speed up.
    """
    ratio = _check_ratio(ratio)
    layers = lora_modules(model)
    if not layers:
        raise ValueError("LoRA+ needs LoRA layers (their lora_B learns lambda times faster); the model has none: "
                         "apply_lora first")
    b_ids = {id(m.lora_B) for _, m in layers}
    trainable = model.parameters(trainable_only=True)
    return [{"params": [p for p in trainable if id(p) not in b_ids]},
            {"params": [p for p in trainable if id(p) in b_ids], "lr_ratio": ratio}]


def optimizer_groups(model: Module) -> list:
    """How the training loop's optimizer groups ``model``'s trainable parameters: LoRA+'s two groups when the
    model's LoRA config has a loraplus_ratio, otherwise one group of them all."""
    config = getattr(model, "lora_config", None)
    ratio = getattr(config, "loraplus_ratio", None)
    if ratio is not None:
        return loraplus_groups(model, ratio)
    return [{"params": model.parameters(trainable_only=True)}]


def lr_ratios(model: Module, groups: list) -> dict:
    """{parameter name: lr_ratio} of the parameters of ``groups`` whose ratio is not 1 (a run's record: resuming
    with other ratios would train differently)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: float(group.get("lr_ratio", 1.0)) for group in groups for p in group["params"]
            if group.get("lr_ratio", 1.0) != 1.0}
