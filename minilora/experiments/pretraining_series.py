"""A series of checkpoints of one pretraining run, from random initialisation to the shipped model, cached.

The shipped tiny GPT (minilora/pretrained/) was made by ``minilora pretrain`` with its defaults. ``Recipe``
holds that command's settings (model shape, corpus, steps, batch, learning-rate schedule, dropout, seed) and
builds the same GPTConfig, initial model and TrainConfig as the command does; ``build_series`` replays the run
with ``train.fit`` and keeps the weights at a few steps on the way (``keep``: step 0 is the initialisation).
Nothing it adds changes the run: the weights are read in fit's validation hook, which runs in evaluation mode
and draws no random numbers, so the replayed weights are the ones the command would produce.

Reproducing the shipped weights. Training draws every batch and every dropout mask from seeded generators, so a
replay on the same machine with the same thread count repeats the run bit for bit. The thread count matters:
fit splits each batch over data-parallel replicas whose dropout masks come from per-replica streams, so 1 and
2 threads train on different masks. ``minilora pretrain`` uses every core (threads=None); the shipped model
was made on a 2-core machine, so the recipe fixes ``threads=SHIPPED_THREADS``. On another CPU (another BLAS
kernel, other rounding, or code whose operations round differently since the shipped run) the runs drift apart
over the steps, as training runs do: the last checkpoint is then another model of the same recipe, not the
shipped weights. ``check_against_shipped`` measures the largest absolute difference of any weight, and
``loss_difference`` the difference of the two models' losses on the pretraining corpus's validation text
(LOSS_CHECK_BATCHES batches). A series is accepted as "the shipped recipe" when its last checkpoint equals the
shipped weights to float32 rounding (SHIPPED_TOLERANCE: the same run) or, failing that, reaches the shipped
model's validation loss within SHIPPED_LOSS_TOLERANCE (a replay of the recipe that ends as good; both
differences are recorded and every study that uses the series prints them). Anything else is refused (a
RuntimeError), so a study never silently analyses a run that did not end where the shipped model did. The check
applies to the full recipe only; a shortened recipe (``Recipe(steps=...)``, used by fast variants) ends
elsewhere.

Cache: ``<cache_dir>/pretraining-<key>/step-<N>.safetensors`` (one minilora checkpoint per kept step, written
atomically) and ``series.json`` (the kept steps, the pretraining validation curve, the wall time, the check
against the shipped model), key = sha256 of the recipe, the kept steps and the corpus text. A complete cache is
read back instead of training again; anything missing and the run is replayed from the start.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy

from ..core import backend
from ..core.model import GPT, GPTConfig
from ..data import load_corpus
from ..io.checkpoints import load_checkpoint, save_checkpoint
from ..io.files import read_json, write_json
from ..io.pretrained import load_pretrained, pretrained_info
from ..train import TrainConfig, evaluate, fit

SHIPPED_THREADS = 2          # the data-parallel threads of the shipped run: every core of the 2-core machine
SHIPPED_TOLERANCE = 1e-5     # largest |weight difference| still counted as float32 rounding (a few ulps of the
                             # largest weights); a replay that diverged differs by far more
SHIPPED_LOSS_TOLERANCE = 0.02   # nats per character: far below what 300 more pretraining steps change (see the curve)
LOSS_CHECK_BATCHES = 8          # validation batches (of the recipe's batch size) behind the loss comparison
CURVE_BATCHES = 2            # validation batches (of the recipe's batch size) behind each point of the curve


@dataclass(frozen=True)
class Recipe:
    """The settings of ``minilora pretrain`` (its defaults: the shipped model's recipe)."""

    corpus: str = "pydoc"
    text_source: str = "snapshot"
    steps: int = 1800
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 100
    dropout: float = 0.1
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    seed: int = 0
    threads: int = SHIPPED_THREADS

    def model_config(self) -> GPTConfig:
        return GPTConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, block_size=self.block_size,
                         dropout=self.dropout)

    def initial_model(self) -> GPT:
        """The model before the first step, as ``minilora pretrain`` builds it."""
        return GPT(self.model_config(), seed=self.seed)

    def train_config(self, eval_every: int = 0) -> TrainConfig:
        """The TrainConfig ``minilora pretrain`` trains with (checkpoints and output folder aside, which do not
        change the weights); eval_every: how often fit's validation hook runs."""
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, min_lr=self.lr / 10,
                           warmup_steps=min(self.warmup_steps, self.steps), eval_every=eval_every,
                           checkpoint_every=0, seed=self.seed, quiet=True, threads=self.threads)

    def is_shipped(self) -> bool:
        """Whether this is the recipe of the shipped model (the full run, not a shortened one)."""
        return self == Recipe()

    def key(self, keep) -> str:
        """The cache key: the recipe, the kept steps and the corpus text it trains on."""
        corpus = load_corpus(self.corpus, self.text_source)
        blob = json.dumps({"recipe": dataclasses.asdict(self), "keep": sorted(keep), "corpus": corpus.sha256},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Series:
    """The kept checkpoints of one replayed pretraining run."""

    recipe: dict
    steps: list                      # the kept pretraining steps, increasing (0: the initialisation)
    paths: list                      # one checkpoint file per kept step
    curve: list                      # [[step, validation loss on the pretraining corpus]], the run's curve
    seconds: float                   # wall time of the replay (when it was built)
    reused: bool                     # read from the cache rather than trained now
    shipped_max_abs_diff: float | None   # largest |weight difference| of the last checkpoint from the shipped
                                         # model (None: a shortened recipe, not checked)
    folder: str = ""
    shipped_loss_diff: float | None = None   # last checkpoint's validation loss - the shipped model's (nats)

    def model(self, i: int, dropout: float | None = 0.0) -> GPT:
        """A fresh copy of the i-th kept checkpoint; dropout replaces the recipe's (None keeps it)."""
        model, _ = load_checkpoint(self.paths[i])
        if dropout is not None:
            model.set_dropout(dropout)
        return model


def check_against_shipped(model) -> float:
    """The largest absolute difference between any weight of ``model`` and the shipped model's."""
    shipped = dict(load_pretrained().named_parameters())
    ours = dict(model.named_parameters())
    if set(ours) != set(shipped):
        raise ValueError(f"the replayed model's parameters differ from the shipped model's: only in the replay "
                         f"{sorted(set(ours) - set(shipped))[:4]}, only shipped {sorted(set(shipped) - set(ours))[:4]}")
    diff = 0.0
    for name, p in ours.items():
        a = backend.to_numpy(p.data).astype(numpy.float64)
        b = backend.to_numpy(shipped[name].data).astype(numpy.float64)
        if a.shape != b.shape:
            raise ValueError(f"{name}: replay shape {a.shape}, shipped {b.shape}")
        diff = max(diff, float(numpy.abs(a - b).max()))
    return diff


def loss_difference(model, recipe: Recipe) -> float:
    """model's validation loss on the recipe's corpus minus the shipped model's (LOSS_CHECK_BATCHES batches)."""
    val = load_corpus(recipe.corpus, recipe.text_source).val
    loss = lambda m: evaluate(m, val, recipe.batch_size, max_batches=LOSS_CHECK_BATCHES)
    shipped = load_pretrained(dropout=0.0)
    model.set_dropout(0.0)
    return loss(model) - loss(shipped)


def _refuse_if_not_shipped(recipe: Recipe, diff: float | None, loss_diff: float | None) -> None:
    if not recipe.is_shipped():
        return
    if diff is not None and diff <= SHIPPED_TOLERANCE:
        return
    if loss_diff is not None and abs(loss_diff) <= SHIPPED_LOSS_TOLERANCE:
        return
    info = pretrained_info()
    raise RuntimeError(
        f"the replayed pretraining run does not end where the shipped model did: its last checkpoint differs from "
        f"minilora/pretrained/tiny_gpt.safetensors by up to {diff:.3g} in a weight (same run: <= "
        f"{SHIPPED_TOLERANCE:g}) and by {loss_diff:+.4f} nats in validation loss (same recipe: within "
        f"{SHIPPED_LOSS_TOLERANCE:g}). The shipped model was made by `{info.get('command')}` with "
        f"{SHIPPED_THREADS} data-parallel threads on NumPy. Refusing to analyse a pretraining series that does not "
        f"end at a model as good as the shipped one")


def _write_series_json(folder: Path, series: Series) -> None:
    record = dataclasses.asdict(series)
    record.pop("reused"), record.pop("folder")
    write_json(folder / "series.json", record)


def build_series(recipe: Recipe, keep, cache_dir, report=None) -> Series:
    """The checkpoints of ``recipe``'s run at the steps ``keep`` (0 and recipe.steps among them), from the
    cache under ``cache_dir`` or by replaying the run (then cached). The full recipe's last checkpoint is
    checked against the shipped model (RuntimeError beyond SHIPPED_TOLERANCE). ``report(text)`` hears of a
    replay before it starts."""
    keep = sorted({int(s) for s in keep})
    if keep[0] != 0 or keep[-1] != recipe.steps or any(s < 0 for s in keep):
        raise ValueError(f"keep must run from 0 to the recipe's {recipe.steps} steps; got {keep}")
    folder = Path(cache_dir) / f"pretraining-{recipe.key(keep)}"
    paths = [folder / f"step-{s:06d}.safetensors" for s in keep]
    index = folder / "series.json"
    if index.is_file() and all(p.is_file() for p in paths):
        saved = read_json(index)
        series = Series(recipe=saved["recipe"], steps=saved["steps"], paths=[str(p) for p in paths],
                        curve=saved["curve"], seconds=saved["seconds"], reused=True,
                        shipped_max_abs_diff=saved["shipped_max_abs_diff"], folder=str(folder),
                        shipped_loss_diff=saved.get("shipped_loss_diff"))
        if recipe.is_shipped() and series.shipped_loss_diff is None:
            series.shipped_loss_diff = loss_difference(series.model(len(paths) - 1), recipe)
            _write_series_json(folder, series)
        _refuse_if_not_shipped(recipe, series.shipped_max_abs_diff, series.shipped_loss_diff)
        return series

    if report is not None:
        report(f"replaying the pretraining run ({recipe.steps} steps of {recipe.batch_size} x {recipe.block_size} "
               f"characters of {recipe.corpus}) to keep steps {keep}; cached in {folder}")
    corpus = load_corpus(recipe.corpus, recipe.text_source)
    every = math.gcd(*[s for s in keep if s > 0])
    meta = {"recipe": dataclasses.asdict(recipe), "pretraining_step": 0}
    done = [0]

    def keep_weights(m):                # fit's validation hook: every ``every`` steps, in evaluation mode
        done[0] = min(done[0] + every, recipe.steps)
        if done[0] in keep:
            save_checkpoint(paths[keep.index(done[0])], m, None, dict(meta, pretraining_step=done[0]))
        loss = evaluate(m, corpus.val, recipe.batch_size, max_batches=CURVE_BATCHES)
        curve.append([done[0], loss])
        return loss

    with backend.backend("numpy"):      # the backend the shipped model was trained on
        model = recipe.initial_model()
        save_checkpoint(paths[0], model, None, meta)
        curve = [[0, evaluate(model, corpus.val, recipe.batch_size, max_batches=CURVE_BATCHES)]]
        t0 = time.perf_counter()
        fit(model, corpus.train, None, recipe.train_config(eval_every=every), validate=keep_weights)
        seconds = time.perf_counter() - t0
    diff = check_against_shipped(model) if recipe.is_shipped() else None
    loss_diff = loss_difference(model, recipe) if recipe.is_shipped() else None
    series = Series(recipe=dataclasses.asdict(recipe), steps=keep, paths=[str(p) for p in paths], curve=curve,
                    seconds=seconds, reused=False, shipped_max_abs_diff=diff, folder=str(folder),
                    shipped_loss_diff=loss_diff)
    _write_series_json(folder, series)      # written even when refused: the record of what the replay found
    _refuse_if_not_shipped(recipe, diff, loss_diff)
    return series
