"""Studies that reproduce the LoRA paper's findings at tiny scale, each runnable as ``minilora experiment NAME``.

Every study module has the same three functions:

    result = run(fast=False, seed=0)     # plain results: a dataclass of numbers and lists
    plot(result, path)                   # a matplotlib figure saved as PNG
    summary(result) -> str               # the numbers as a short text table

``fast=True`` is a seconds-long version for tests; the default finishes in minutes on 2 CPU cores.
"""
from __future__ import annotations

import importlib

STUDIES = {
    "rank-basics": "rank_basics",          # rank, numerical rank, Eckart-Young, parameter counts
    "rank-sweep": "rank_sweep",            # paper Table 6: validation loss against r and target set
    "budget": "budget",                    # paper Table 5: which weights under a fixed parameter budget
    "subspace": "subspace",                # paper 7.2: subspace similarity phi between ranks and seeds
    "delta-w": "delta_w",                  # paper 7.3: how Delta W relates to W (Table 7)
    "full-spectrum": "full_spectrum",      # full fine-tuning's Delta W is low-rank too
    "rslora": "rslora",                    # alpha / r against alpha / sqrt(r)
    "lora-plus": "lora_plus",              # LoRA+: B at lambda times A's learning rate, convergence speed
    "qlora": "qlora",                      # LoRA on a 4-bit NF4 base against LoRA on the float base
    "intrinsic-toy": "intrinsic_toy",      # Li et al.'s toy problem whose intrinsic dimension is exactly 10
    "intrinsic-mlp": "intrinsic_mlp",      # a small network on a small real data set, d on a log scale
    "intrinsic-gpt": "intrinsic_gpt",      # the tiny GPT: d90 pretrained vs random init, DID vs SAID, vs LoRA
    "intrinsic-cost": "intrinsic_cost",    # time per step of dense vs Fastfood projections as d grows
    "compare": "compare",                  # paper Tables 1-4: every fine-tuning method, scores, costs, latency
}


def compare_methods(*args, **kwargs):
    """Every fine-tuning method side by side (see experiments/compare.py): a CompareResult."""
    from .compare import compare_methods as run

    return run(*args, **kwargs)


def study(name: str):
    """The module of a study by its CLI name (see STUDIES)."""
    if name not in STUDIES:
        raise ValueError(f"unknown experiment {name!r}; expected one of {sorted(STUDIES)}")
    return importlib.import_module(f"{__name__}.{STUDIES[name]}")
