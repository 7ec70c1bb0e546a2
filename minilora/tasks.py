"""A classification task built offline from what Python installs, solved by a language model with label tokens.

    "prose-or-package" is a snippet English prose (Python's help topics), or Python source from the standard
                       library's email, tkinter or asyncio package? 4 classes; the default task
    "stdlib-package"   which standard-library package does a snippet of Python source come from? (asyncio,
                       email, tkinter, xml: harder, no prose to spot)

Snippets are 63 characters from anywhere in the text. A word-count naive Bayes classifier reaches 84% on
stdlib-package; the tiny pretrained GPT needs many more steps than the comparison gives it to get there.

Classification with a causal language model needs no new head: the model reads the snippet and is asked, at
every position, for one of K label tokens ("0", "1", ...). Training minimises the cross-entropy of the right
label token at every position (each position guesses from the characters it has seen so far, which gives T
training signals per snippet instead of one); accuracy reads the last position only, which has seen the
whole snippet: how often the right label has the largest logit among the K label tokens. Every fine-tuning
method trains the same way, so their scores are comparable.

Each package's source is split like the corpora: the first 90% gives training snippets (drawn at random
each step), the last 10% the validation snippets (a fixed, evenly spread set per class).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy

from .core import backend
from .data import VAL_FRACTION, _pydoc_text, _stdlib_package_text
from .core.optim import AdamW, clip_grad_norm, cosine_schedule
from .fast.parallel import ParallelStep, default_threads
from .tokenizer import encode

IGNORE = -1                       # target of the positions that are not asked anything
TASKS = {
    "stdlib-package": ("asyncio", "email", "tkinter", "xml"),
    "prose-or-package": ("pydoc", "email", "tkinter", "asyncio"),
}


@dataclass
class ClassificationTask:
    """classes: names; label_ids: (K,) the label token of each class; train: per class, a uint8 array of
    token ids to draw snippets from; val_x: (N, length) snippets; val_y: (N,) class indices."""

    name: str
    classes: tuple
    label_ids: numpy.ndarray
    length: int
    train: list
    val_x: numpy.ndarray
    val_y: numpy.ndarray


def load_task(name: str = "prose-or-package", length: int = 63, val_per_class: int = 64) -> ClassificationTask:
    """Build a task (see TASKS); snippets have ``length`` tokens, validation has val_per_class per class."""
    if name not in TASKS:
        raise ValueError(f"unknown classification task {name!r}; expected one of {sorted(TASKS)}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1; got {length!r}")
    if isinstance(val_per_class, bool) or not isinstance(val_per_class, int) or val_per_class < 1:
        raise ValueError(f"val_per_class must be an int >= 1; got {val_per_class!r}")
    classes = TASKS[name]
    train, val_x, val_y = [], [], []
    for k, package in enumerate(classes):
        ids = encode(_pydoc_text() if package == "pydoc" else _stdlib_package_text(package))
        cut = int(len(ids) * (1 - VAL_FRACTION))
        train.append(ids[:cut])
        val = ids[cut:]
        starts = numpy.linspace(0, len(val) - length, val_per_class).astype(numpy.int64)
        val_x.extend(val[s:s + length] for s in starts)
        val_y.extend([k] * val_per_class)
    label_ids = encode("".join(str(k) for k in range(len(classes)))).astype(numpy.int64)
    return ClassificationTask(name, classes, label_ids, length, train, numpy.stack(val_x).astype(numpy.int64),
                              numpy.asarray(val_y, dtype=numpy.int64))


def classification_batch(task: ClassificationTask, batch_size: int, rng, every_position: bool = True):
    """batch_size random training snippets of random classes -> idx (B, L), targets (B, L) on the backend:
    the class's label token at every position (or, with every_position=False, at the last position only and
    IGNORE elsewhere)."""
    labels = rng.integers(0, len(task.classes), size=batch_size)
    idx = numpy.empty((batch_size, task.length), dtype=numpy.int64)
    for i, k in enumerate(labels):
        start = rng.integers(0, len(task.train[k]) - task.length)
        idx[i] = task.train[k][start:start + task.length]
    targets = numpy.full((batch_size, task.length), IGNORE, dtype=numpy.int64)
    targets[:, (0 if every_position else -1):] = task.label_ids[labels][:, None]
    return backend.asarray(idx), backend.asarray(targets)


def accuracy(model, task: ClassificationTask, batch_size: int = 64, max_examples: int | None = None) -> float:
    """Fraction of validation snippets whose label token has the largest logit among the K label tokens."""
    x, y = task.val_x, task.val_y
    if max_examples is not None:          # an even share of every class
        keep = numpy.concatenate([numpy.flatnonzero(y == k)[:max(1, max_examples // len(task.classes))]
                                  for k in range(len(task.classes))])
        x, y = x[keep], y[keep]
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(x), batch_size):
            logits = model.forward(x[i:i + batch_size])[:, -1, :]                       # (b, V)
            label_logits = backend.to_numpy(logits[:, backend.asarray(task.label_ids)])  # (b, K)
            correct += int((label_logits.argmax(axis=1) == y[i:i + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(x)


@dataclass
class ClassifierRun:
    losses: list            # training loss per step
    step_seconds: float     # mean wall time of a training step


def train_classifier(model, task: ClassificationTask, steps: int, batch_size: int, lr: float, seed: int = 0,
                     warmup_steps: int = 10, grad_clip: float = 1.0) -> ClassifierRun:
    """Train the trainable parameters of ``model`` on the task: AdamW (no weight decay), warmup + cosine to
    lr / 10, global-norm clipping, data-parallel over the cores as ``train.fit``. Returns the losses and the
    time per step."""
    params = model.parameters(trainable_only=True)
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = AdamW(params, lr=lr, weight_decay=0.0)
    rng = numpy.random.default_rng(seed)
    model.train()
    parallel = ParallelStep(model, default_threads(batch_size))
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        optimizer.lr = cosine_schedule(step, lr, min(warmup_steps, steps), steps, lr / 10)
        idx, targets = classification_batch(task, batch_size, rng)
        loss = parallel.forward_backward(idx, targets, ignore_index=IGNORE)
        if not math.isfinite(loss):
            parallel.close()
            raise FloatingPointError(f"the loss became {loss} at step {step + 1}")
        if grad_clip:
            clip_grad_norm(params, grad_clip)
        optimizer.step()
        model.zero_grad()
        losses.append(loss)
    parallel.close()
    backend.synchronize()
    return ClassifierRun(losses, (time.perf_counter() - t0) / steps)
