"""A classification task built offline from the shipped texts (see data.read_text), solved by a language model
with label tokens.

    "prose-or-package" is a snippet English prose (Python's help topics), or Python source from the standard
                       library's email, tkinter or asyncio package? 4 classes; the default task
    "stdlib-package"   which standard-library package does a snippet of Python source come from? (asyncio,
                       email, tkinter, xml: harder, no prose to spot)

Snippets are 63 characters from anywhere in the text. A word-count naive Bayes classifier already does well on
stdlib-package; the tiny pretrained GPT needs many more steps than the comparison gives it to match that.

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

from dataclasses import dataclass

import numpy

from .core import backend
from .data import VAL_FRACTION, read_text
from .tokenizer import encode
from .train import TrainConfig, fit

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


def load_task(name: str = "prose-or-package", length: int = 63, val_per_class: int = 64,
              source: str = "snapshot") -> ClassificationTask:
    """Build a task (see TASKS); snippets have ``length`` tokens, validation has val_per_class per class.

    source: "snapshot" (the shipped texts, the same on every Python) or "python" (the running Python's copies).
    """
    if name not in TASKS:
        raise ValueError(f"unknown classification task {name!r}; expected one of {sorted(TASKS)}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1; got {length!r}")
    if isinstance(val_per_class, bool) or not isinstance(val_per_class, int) or val_per_class < 1:
        raise ValueError(f"val_per_class must be an int >= 1; got {val_per_class!r}")
    classes = TASKS[name]
    train, val_x, val_y = [], [], []
    for k, text_name in enumerate(classes):
        ids = encode(read_text(text_name, source))
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


def task_batches(task: ClassificationTask, batch_size: int):
    """The task as training batches for ``train.fit``: a function rng -> (idx, targets), each (B, L), drawn by
    classification_batch; train with ignore_index=IGNORE."""
    def draw(rng):
        return classification_batch(task, batch_size, rng)
    return draw


def classifier_config(steps: int, batch_size: int, lr: float, seed: int = 0, warmup_steps: int = 10,
                      grad_clip: float = 1.0, **fields) -> TrainConfig:
    """How a classifier trains: AdamW with the usual betas (0.9, 0.999) and no weight decay, warmup + cosine
    to lr / 10, global-norm clipping, no validation or checkpoints; ``fields`` set any other TrainConfig field."""
    return TrainConfig.for_finetuning(steps, batch_size, lr, warmup_steps, **{
        **dict(beta2=0.999, grad_clip=grad_clip, eval_every=0, seed=seed, quiet=True), **fields})


@dataclass
class ClassifierRun:
    losses: list            # training loss per step
    step_seconds: float     # mean wall time of a training step


def train_classifier(model, task: ClassificationTask, steps: int, batch_size: int, lr: float, seed: int = 0,
                     warmup_steps: int = 10, grad_clip: float = 1.0) -> ClassifierRun:
    """Train the trainable parameters of ``model`` on the task with ``train.fit`` (see classifier_config for
    the optimizer and schedule). Returns the losses and the time per step."""
    config = classifier_config(steps, batch_size, lr, seed, warmup_steps, grad_clip)
    result = fit(model, config=config, batches=task_batches(task, batch_size), ignore_index=IGNORE)
    return ClassifierRun([loss for _, loss in result.train], result.seconds / result.steps)
