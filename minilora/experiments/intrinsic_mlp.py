"""Intrinsic dimension of a small network on a small real data set (Li et al. 2018's MNIST-FC analogue).

Task: predict the next character of Python's help text (corpus "pydoc", vocab 96) from the previous 3
characters. Model: a 2-layer MLP on the one-hot context (3 x 96 = 288 inputs) -> HIDDEN GELU units -> 96 logits,
written with minilora.functional's linear/gelu pairs and softmax_cross_entropy; D = 288 H + H + 96 H + 96.

- baseline: all D parameters trained (full-batch AdamW, lr 1e-2, no weight decay) from the random init theta_0;
- subspace: theta = theta_0 + P theta_d with a Fastfood P (intrinsic.SubspaceModel wraps the MLP), only theta_d
  trained (full-batch AdamW, lr 0.1 cosine-decayed), for d on a log scale.

Metric: validation accuracy (argmax of the logits = the next character). d90 convention: the smallest d in
the sweep whose validation accuracy reaches 90% of the full-training validation accuracy (accuracy itself, not
the improvement over chance; chance, the most frequent character, is also reported). The sweep is coarse, so d90
is known only up to its grid step.

Default: H = 64 (D = 24,736), 4,000 training and 2,000 validation examples, 300 full-batch steps per run,
d in 10, 100, 300, 1000, 3000; a few minutes on a shared 2-core CPU. ``fast=True``: H = 16, 1,000 / 500
examples, 40 steps, d in 10, 100: a few seconds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from ..core import functional as F
from ..data import load_corpus
from ..core.intrinsic import SubspaceModel
from ..core.nn import Module, Parameter
from ..core.optim import AdamW
from . import common

CONTEXT, VOCAB = 3, 96
FULL_LR, SUBSPACE_LR = 1e-2, 0.1


class CharMLP(Module):
    """logits = gelu(onehot(idx) W1 + b1) W2 + b2; idx: (N, CONTEXT) ints in [0, VOCAB)."""

    def __init__(self, hidden: int, seed: int = 0):
        rng = numpy.random.default_rng(seed)
        n_in = CONTEXT * VOCAB
        self.w1 = Parameter(rng.standard_normal((n_in, hidden)) / math.sqrt(CONTEXT), decay=True)  # CONTEXT ones a row
        self.b1 = Parameter(numpy.zeros(hidden))
        self.w2 = Parameter(rng.standard_normal((hidden, VOCAB)) / math.sqrt(hidden), decay=True)
        self.b2 = Parameter(numpy.zeros(VOCAB))

    @staticmethod
    def one_hot(idx):
        x = numpy.zeros((idx.shape[0], CONTEXT * VOCAB))
        x[numpy.arange(idx.shape[0])[:, None], numpy.arange(CONTEXT) * VOCAB + idx] = 1.0
        return x

    def forward(self, idx):
        h, c1 = F.linear_forward(self.one_hot(idx), self.w1.data, self.b1.data)
        a, cg = F.gelu_forward(h)
        logits, c2 = F.linear_forward(a, self.w2.data, self.b2.data)
        self._cache = (c1, cg, c2)
        return logits

    def backward(self, dlogits):
        c1, cg, c2 = self._pop_cache()
        da, dw2, db2 = F.linear_backward(dlogits, c2)
        _, dw1, db1 = F.linear_backward(F.gelu_backward(da, cg), c1)
        for p, g in ((self.w1, dw1), (self.b1, db1), (self.w2, dw2), (self.b2, db2)):
            p.accumulate_grad(g)
        return None


def examples(ids, n: int, rng):
    """n random (context (n, 3), next character (n,)) pairs from a token array."""
    starts = rng.choice(len(ids) - CONTEXT, size=n, replace=False)
    ctx = numpy.stack([ids[starts + k] for k in range(CONTEXT)], axis=1).astype(numpy.int64)
    return ctx, ids[starts + CONTEXT].astype(numpy.int64)


def accuracy(model, x, y) -> float:
    return float((model.forward(x).argmax(axis=1) == y).mean())


def train(model, x, y, steps: int, lr: float) -> float:
    """Full-batch AdamW (no weight decay, cosine lr); returns the final training loss."""
    opt = AdamW(model.parameters(trainable_only=True), lr=lr, weight_decay=0.0)
    loss = float("nan")
    for step in range(steps):
        opt.lr = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        model.zero_grad()
        loss, dlogits = F.softmax_cross_entropy(model.forward(x), y)
        model.backward(dlogits)
        opt.step()
    model._cache = None
    model.__dict__.pop("_cache", None)
    return loss


@dataclass
class MLPResult:
    hidden: int
    D: int
    n_train: int
    n_val: int
    steps: int
    chance: float                    # validation accuracy of always predicting the most frequent training char
    init_accuracy: float             # theta_0 (= every subspace run at theta_d = 0)
    full_accuracy: float             # all D trained
    full_train_loss: float
    ds: list = field(default_factory=list)
    accuracies: list = field(default_factory=list)       # validation accuracy per d (fastfood)
    train_losses: list = field(default_factory=list)
    d90: int | None = None           # smallest d with accuracy >= 0.9 x full_accuracy
    projection: str = "fastfood"
    seed: int = 0


@common.on_the_host
def run(fast: bool = False, seed: int = 0) -> MLPResult:
    hidden, n_train, n_val, steps = (16, 1000, 500, 40) if fast else (64, 4000, 2000, 300)
    ds = [10, 100] if fast else [10, 100, 300, 1000, 3000]
    corpus = load_corpus("pydoc")
    rng = numpy.random.default_rng(seed)
    xt, yt = examples(corpus.train, n_train, rng)
    xv, yv = examples(corpus.val, n_val, rng)
    chance = float((yv == numpy.bincount(yt, minlength=VOCAB).argmax()).mean())

    full = CharMLP(hidden, seed=seed)
    D = full.num_parameters()
    init_acc = accuracy(full, xv, yv)
    full_loss = train(full, xt, yt, steps, FULL_LR)
    result = MLPResult(hidden=hidden, D=D, n_train=n_train, n_val=n_val, steps=steps, chance=chance,
                       init_accuracy=init_acc, full_accuracy=accuracy(full, xv, yv), full_train_loss=full_loss,
                       seed=seed)
    common.progress("intrinsic-mlp", fast, f"full D={D}: val accuracy {result.full_accuracy:.4f}")
    for d in ds:
        model = SubspaceModel(CharMLP(hidden, seed=seed), d, projection="fastfood", seed=seed + d)
        result.train_losses.append(train(model, xt, yt, steps, SUBSPACE_LR))
        result.ds.append(d)
        result.accuracies.append(accuracy(model, xv, yv))
        model.__dict__.pop("_cache", None)
        common.progress("intrinsic-mlp", fast, f"d={d}: val accuracy {result.accuracies[-1]:.4f}")
    result.d90 = next((d for d, a in zip(result.ds, result.accuracies) if a >= 0.9 * result.full_accuracy), None)
    return result


def summary(result: MLPResult) -> str:
    lines = [f"Intrinsic dimension of a char MLP on pydoc (3 chars -> next; one-hot 288 -> {result.hidden} GELU -> 96), "
             f"D = {result.D:,}", f"{result.n_train:,} train / {result.n_val:,} val examples, {result.steps} "
             f"full-batch AdamW steps per run; Fastfood projection", "",
             f"{'run':>12}{'val accuracy':>14}{'train loss':>12}",
             f"{'full (all D)':>12}{result.full_accuracy:>14.4f}{result.full_train_loss:>12.4f}"]
    for d, a, l in zip(result.ds, result.accuracies, result.train_losses):
        lines.append(f"{'d=' + str(d):>12}{a:>14.4f}{l:>12.4f}")
    lines += [f"{'theta_0':>12}{result.init_accuracy:>14.4f}", f"{'chance':>12}{result.chance:>14.4f}", "",
              (f"d90 (smallest d with accuracy >= 90% of full, i.e. >= {0.9 * result.full_accuracy:.4f}): "
               f"{result.d90} = {100 * result.d90 / result.D:.2f}% of D") if result.d90 is not None else
              f"d90: not reached in the sweep (90% of full = {0.9 * result.full_accuracy:.4f})",
              "Li et al. 2018: MNIST FC (D = 199,210) d90 ~ 750 (0.4% of D)"]
    return "\n".join(lines)


def plot(result: MLPResult, path) -> None:
    from ..plots import new_figure, save_figure

    fig, ax = new_figure(figsize=(7, 4.5))
    ax.semilogx(result.ds, result.accuracies, "o-", label="subspace (Fastfood), val accuracy")
    ax.axhline(result.full_accuracy, color="C1", label=f"full training, D = {result.D:,}")
    ax.axhline(0.9 * result.full_accuracy, color="C1", linestyle="--", label="90% of full")
    ax.axhline(result.chance, color="gray", linestyle=":", label="most frequent character")
    if result.d90 is not None:
        ax.axvline(result.d90, color="red", linestyle=":", label=f"d90 = {result.d90}")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Char MLP on pydoc: accuracy against d")
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
