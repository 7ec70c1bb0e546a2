"""The training loop: AdamW, warmup + cosine schedule, gradient clipping, validation, checkpoints, resume.

    result = ml.train.fit(model, corpus.train, corpus.val, ml.train.TrainConfig(steps=2000, out_dir="runs/a"))

Every training run in minilora goes through ``fit``: language modelling on a token array (random windows, the
next token as target), and anything else that can say how to draw a batch (``batches``, e.g. a classification
task's snippets with targets at some positions only, ``ignore_index`` elsewhere).

A checkpoint is ONE safetensors file (model weights, AdamW moments) whose header carries the JSON metadata
(model config, step, optimizer step count, random-generator states, loss history), written atomically, so a
crash can never leave half a checkpoint; a JSON copy of the metadata sits beside it for people to read.
Resuming from it reproduces the losses of an uninterrupted run exactly; it is refused (a ValueError naming the
difference) when the model, its dtype, the set of trainable parameters or a setting that changes the result
differs. A non-finite loss or gradient stops training with a FloatingPointError before anything is written, and
every parameter and AdamW moment is checked finite before each checkpoint and at the end (``check_finite``), so
a checkpoint never holds a NaN or inf and the last good one stays intact. A run that starts writing into out_dir
first clears the temporary files a killed run's atomic writes left there.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy

from .core import backend
from .data import get_batch, sequential_batches
from .core.model import GPT, cross_entropy
from .core.nn import dropout_generators
from .core.loraplus import lr_ratios, optimizer_groups
from .core.optim import AdamW, clip_grad_norm, cosine_schedule
from .fast.parallel import ParallelStep, blas_threads, default_threads
# the checkpoint functions live in io.checkpoints; train.load_checkpoint and the others stay importable here
from .io.checkpoints import CHECKPOINT_NAME, load_checkpoint, read_checkpoint, rng_state, save_checkpoint  # noqa: F401
from .io.files import remove_stale_temporaries

# the TrainConfig fields a resumed run must share with the checkpoint's run: each changes the weights, the losses
# or the validation curve (out_dir, checkpoint_every, quiet and threads do not)
RESUME_FIELDS = ("steps", "batch_size", "block_size", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1",
                 "beta2", "grad_clip", "eval_every", "eval_batches", "seed")


@dataclass
class TrainConfig:
    """How to train. lr is the peak learning rate; min_lr the floor the cosine decays to."""

    steps: int = 1000
    batch_size: int = 32
    block_size: int | None = None      # window length; None = the model's block_size
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0              # global-norm clipping; 0 turns it off
    eval_every: int = 100               # validate every N steps (and at the end); 0 = never
    eval_batches: int | None = 8        # batches of the validation text used (None = all of it)
    checkpoint_every: int = 500         # 0 = only at the end (when out_dir is set)
    out_dir: str | None = None
    seed: int = 0
    quiet: bool = False                 # no progress bar
    threads: int | None = None          # data-parallel threads (fast/parallel.py); 1: the plain loop; None: every
                                        # core on NumPy's fast path, 1 on CuPy or on the reference core

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1; got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0; got {getattr(self, name)!r}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"TrainConfig.warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr; got lr={self.lr}, min_lr={self.min_lr}")
        if self.grad_clip < 0:
            raise ValueError(f"TrainConfig.grad_clip must be >= 0; got {self.grad_clip}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"TrainConfig.threads must be None or an int >= 1; got {self.threads!r}")

    @classmethod
    def for_finetuning(cls, steps: int, batch_size: int, lr: float, warmup_steps: int = 20, **fields):
        """A short fine-tuning run: peak lr with a cosine decay to a tenth of it, warmup_steps of warmup (at
        most steps), no weight decay, no checkpoints before the end; ``fields`` set any other field."""
        return cls(**{**dict(steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10,
                             warmup_steps=min(warmup_steps, steps), weight_decay=0.0, checkpoint_every=0), **fields})


@dataclass
class TrainResult:
    """Loss history: train is [[step, loss], ...] per step; val is [[step, score], ...] per validation (the
    validation loss, or what fit's ``validate`` returned)."""

    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    steps: int = 0                      # the run's last step (config.steps)
    steps_run: int = 0                  # steps this call ran (fewer than steps when it resumed a checkpoint)
    seconds: float = 0.0                # wall time of this call, validation and checkpoints included
    eval_seconds: float = 0.0           # of which validation
    tokens_per_second: float = 0.0      # training tokens per second, validation excluded
    checkpoint: str | None = None


# ----------------------------------------------------------------------------------------------------
# evaluation


def evaluate(model: GPT, ids, batch_size: int = 32, block_size: int | None = None, max_batches: int | None = None) -> float:
    """Mean cross-entropy (nats per token) over non-overlapping windows of ``ids``, in evaluation mode.

    max_batches: use only the first max_batches batches (None: the whole text). Divide by ln 2 for bits per
    token (= bits per character with the character tokenizer).
    """
    block_size = block_size or model.config.block_size
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        # one BLAS thread: evaluation's matrices are small, so more threads gain little on a quiet machine, and
        # beside another busy process OpenBLAS's threads wait on each other for cores (many times slower)
        with blas_threads(1):
            for idx, targets in sequential_batches(ids, batch_size, block_size, max_batches):
                loss, _ = cross_entropy(model.forward(idx), targets)
                total += loss * targets.size
                count += targets.size
    finally:
        model.train(was_training)
    return total / count


# ----------------------------------------------------------------------------------------------------
# the loop


def forward_backward(model: GPT, idx, targets, ignore_index=None) -> float:
    """One step's gradients: the batch's mean cross-entropy, and its gradient in every trainable p.grad.

    idx, targets: integer arrays (B, T); ignore_index: a target value whose positions count for nothing.
    Returns the loss (a Python float)."""
    loss, dlogits = cross_entropy(model.forward(idx), targets, ignore_index)
    model.backward(dlogits)
    return loss


def check_finite(model: GPT, step: int, optimizer: AdamW | None = None, last_checkpoint=None) -> None:
    """Raise a FloatingPointError unless every parameter of ``model`` (and every AdamW moment) is finite.

    The message names the first non-finite tensor, the step after which it was found, and says that nothing
    was written: the last checkpoint (``last_checkpoint``; None: none was written) is untouched. fit calls it
    before each checkpoint and at the end, finetune before saving its result; not every step, because a
    non-finite weight shows in the next step's loss anyway, and the loss is one number where this pass reads
    every weight and moment."""
    tensors = [(f"parameter {name}", p.data) for name, p in model.named_parameters()]
    if optimizer is not None:
        names = {id(p): name for name, p in model.named_parameters()}
        for p, m, v in zip(optimizer.params, optimizer.m, optimizer.v):
            if m is not None:
                tensors += [(f"AdamW's first moment of {names.get(id(p), '?')}", m),
                            (f"AdamW's second moment of {names.get(id(p), '?')}", v)]
    for what, array in tensors:
        xp = backend.get_array_module(array)
        if not bool(xp.isfinite(array).all()):
            bad = int((~xp.isfinite(array)).sum())
            raise FloatingPointError(
                f"{what} holds {bad} non-finite value{'s' if bad != 1 else ''} (nan/inf) after step {step}: "
                f"training stopped and nothing was written; the last checkpoint "
                f"({last_checkpoint or 'none written by this run'}) is untouched")


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):          # a replaced or closed stream
        return False


def fit(model: GPT, train_ids=None, val_ids=None, config: TrainConfig | None = None, resume_from=None,
        meta: dict | None = None, *, batches=None, ignore_index=None, validate=None) -> TrainResult:
    """Train ``model`` in place on the token array ``train_ids``; validate on ``val_ids`` (optional).

    The optimizer is AdamW over ``loraplus.optimizer_groups(model)``: one group, or LoRA+'s two when the
    model's LoRA config has a loraplus_ratio (B at that multiple of the scheduled rate).

    resume_from: a checkpoint written by an earlier run with the same model and config; training continues
    from its step and reproduces that run's losses and weights exactly (a ValueError names what differs: the
    model config, the dtype, the trainable parameters, a field of RESUME_FIELDS, the LoRA+ ratio); a
    RuntimeWarning when the backend, path or data-parallel thread count differs (threads=None follows the
    machine's cores), as the sums then round differently. meta: extra metadata for checkpoints (e.g. the
    corpus name). Returns the loss history.

    Checkpoints: with config.out_dir, ``<out_dir>/checkpoint.safetensors`` every config.checkpoint_every steps
    and at the end (stale temporaries of a killed run in out_dir are cleared first). Before each checkpoint and
    at the end every parameter and AdamW moment is checked finite (check_finite): a FloatingPointError, and the
    last checkpoint on disk stays as it was; so does a non-finite loss or gradient norm.

    Other data than a token array:
        batches       ``batches(rng) -> (idx, targets)``, both integer arrays (B, T) on the backend: how to draw
                      one training batch from the NumPy generator ``rng`` (the run's own, so that a checkpoint
                      holds its state and a resumed run draws the same batches); instead of train_ids
        ignore_index  the target value of positions that count for nothing (the loss is the mean over the rest)
        validate      ``validate(model) -> float``, a validation score computed every config.eval_every steps
                      (and at the end) with the model in evaluation mode, instead of the loss on val_ids
    """
    config = config or TrainConfig()
    if (train_ids is None) == (batches is None):
        raise ValueError("fit needs exactly one source of training batches: a token array train_ids or a "
                         f"function batches(rng); got train_ids={'None' if train_ids is None else 'an array'}, "
                         f"batches={batches!r}")
    for name, function in (("batches", batches), ("validate", validate)):
        if function is not None and not callable(function):
            raise TypeError(f"fit's {name} must be a function; got {type(function).__name__} {function!r}")
    if val_ids is not None and validate is not None:
        raise ValueError("give fit val_ids (validation loss on a token array) or validate (a function), not both")
    block_size = config.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise ValueError(f"TrainConfig.block_size {block_size} exceeds the model's block_size {model.config.block_size}")
    params = model.parameters(trainable_only=True)
    if not params:
        raise ValueError("the model has no trainable parameters")
    if batches is None:
        def batches(rng):              # random windows of the text, the next token as target
            return get_batch(train_ids, config.batch_size, block_size, rng)
    if validate is None and val_ids is not None:
        def validate(m):               # the validation loss on the first eval_batches windows of val_ids
            return evaluate(m, val_ids, config.batch_size, block_size, config.eval_batches)
    groups = optimizer_groups(model)       # one group; LoRA+: B at loraplus_ratio times the schedule's rate
    optimizer = AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay)
    batch_rng = numpy.random.default_rng(config.seed)
    result = TrainResult()
    threads = config.threads or (default_threads(config.batch_size) if backend.fast_enabled() else 1)
    # how the steps are computed: another backend, path or thread count rounds differently (the same to ~1e-7)
    compute = {"backend": backend.current_backend(), "fast": backend.fast_enabled(), "threads": threads}
    start = 0
    if resume_from is not None:
        start, saved = _resume(resume_from, model, optimizer, batch_rng, result, config)
        if saved.get("compute", compute) != compute:
            warnings.warn(f"resuming {resume_from}, computed with {saved['compute']}, with {compute}: the rest of "
                          "the run rounds differently and will match an uninterrupted run closely, not bit for bit "
                          "(give TrainConfig.threads to fix the thread count)", RuntimeWarning, stacklevel=2)
    out_dir = Path(config.out_dir) if config.out_dir else None
    run_meta = dict(meta or {}, train_config=asdict(config), compute=compute,
                    trainable=[name for name, _ in model.named_parameters(trainable_only=True)],
                    lr_ratios=lr_ratios(model, groups))
    if out_dir is not None:
        remove_stale_temporaries(out_dir)          # what a killed run's atomic writes left behind

    def checkpoint(step):
        check_finite(model, step, optimizer, result.checkpoint)
        state = dict(run_meta, step=step, history={"train": result.train, "val": result.val},
                     batch_rng=rng_state(batch_rng),
                     dropout_rngs=[rng_state(g) for g in dropout_generators(model)])
        result.checkpoint = str(save_checkpoint(out_dir / CHECKPOINT_NAME, model, optimizer, state))

    from tqdm.auto import tqdm

    # a live bar on a terminal; on a file or a pipe, one line per evaluation point instead of a bar's redraws
    live = not config.quiet and _is_terminal(sys.stderr)
    bar = tqdm(total=config.steps, initial=start, disable=not live, desc="train", unit="step")
    model.train()
    parallel = ParallelStep(model, threads) if threads > 1 else None
    tokens = 0                                                    # training tokens this call, for tokens/s
    t0 = time.perf_counter()
    try:
        for step in range(start, config.steps):
            optimizer.lr = cosine_schedule(step, config.lr, config.warmup_steps, config.steps, config.min_lr)
            idx, targets = batches(batch_rng)
            if parallel is None:                                  # fills every trainable p.grad
                loss = forward_backward(model, idx, targets, ignore_index)
            else:
                loss = parallel.forward_backward(idx, targets, ignore_index)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss} at step {step + 1}: training stopped; "
                                         f"the last checkpoint ({result.checkpoint or 'none written'}) is untouched")
            if config.grad_clip:
                norm = clip_grad_norm(params, config.grad_clip)
            else:
                norm = math.sqrt(sum(float((p.grad * p.grad).sum()) for p in params if p.grad is not None))
            if not math.isfinite(norm):
                raise FloatingPointError(f"the gradient norm became {norm} at step {step + 1}: training stopped; "
                                         f"the last checkpoint ({result.checkpoint or 'none written'}) is untouched")
            optimizer.step()
            model.zero_grad()
            done = step + 1
            tokens += idx.size
            result.train.append([done, loss])
            postfix = {"loss": f"{loss:.3f}"}
            if validate is not None and config.eval_every and (done % config.eval_every == 0 or done == config.steps):
                t_eval = time.perf_counter()
                model.eval()
                try:
                    val = validate(model)
                finally:
                    model.train()
                result.eval_seconds += time.perf_counter() - t_eval
                result.val.append([done, val])
                postfix["val"] = f"{val:.3f}"
            if out_dir is not None and ((config.checkpoint_every and done % config.checkpoint_every == 0)
                                        or done == config.steps):
                checkpoint(done)
            elapsed = time.perf_counter() - t0
            postfix["tok/s"] = f"{tokens / max(elapsed - result.eval_seconds, 1e-9):.0f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if not live and not config.quiet and "val" in postfix:
                print(f"step {done}/{config.steps}: " + ", ".join(f"{k} {v}" for k, v in postfix.items()), flush=True)
        backend.synchronize()          # the GPU's queued work belongs to the time of the last step
        check_finite(model, config.steps, optimizer, result.checkpoint)      # what the caller gets back
    finally:
        bar.close()
        if parallel is not None:
            parallel.close()
        model.zero_grad()
    result.steps = config.steps
    result.steps_run = config.steps - start
    result.seconds = time.perf_counter() - t0
    result.tokens_per_second = tokens / max(result.seconds - result.eval_seconds, 1e-9)
    return result


def check_resumable(path, meta: dict, model: GPT, config: TrainConfig) -> None:
    """Raise a ValueError naming the difference unless the checkpoint ``path`` (its metadata ``meta``) can be
    resumed by training ``model`` with ``config``: the same model config, dtype, trainable parameters, their
    learning-rate ratios (LoRA+) and RESUME_FIELDS (checkpoints that predate a record are not checked on it)."""
    if meta.get("model_config") != model.config.to_dict():
        raise ValueError(f"{path} was written for model config {meta.get('model_config')}; this model is "
                         f"{model.config.to_dict()}")
    if "dtype" in meta and meta["dtype"] != model.dtype:
        raise ValueError(f"cannot resume {path}: it holds a {meta['dtype']} model, this model is {model.dtype} "
                         "(the weights would differ)")
    if "trainable" in meta:
        saved = set(meta["trainable"])
        here = {name for name, _ in model.named_parameters(trainable_only=True)}
        if saved != here:
            raise ValueError(f"cannot resume {path}: it trained other parameters than this model trains (only in "
                             f"the checkpoint: {_some(saved - here)}; only here: {_some(here - saved)}): another "
                             "method or other settings?")
    if "lr_ratios" in meta:
        here = lr_ratios(model, optimizer_groups(model))
        if meta["lr_ratios"] != here:
            raise ValueError(f"cannot resume {path}: its parameters learned at other multiples of the learning rate "
                             f"({_ratio_summary(meta['lr_ratios'])}) than this model's ({_ratio_summary(here)}): "
                             "another LoRA+ ratio?")
    saved = meta.get("train_config", {})
    for key in RESUME_FIELDS:
        if key in saved and saved[key] != getattr(config, key):
            raise ValueError(f"cannot resume {path}: it was trained with {key}={saved[key]!r}, "
                             f"this run has {key}={getattr(config, key)!r} (the losses would differ)")


def _ratio_summary(ratios: dict) -> str:
    """{name: ratio} as "lr x 16.0: 4 parameters (h.0.attn.q_proj.lora_B, ...)", or "all at lr"."""
    by_ratio = {}
    for name, ratio in ratios.items():
        by_ratio.setdefault(ratio, []).append(name)
    return "; ".join(f"lr x {ratio:g}: {len(names)} parameters ({_some(names, 2)})"
                     for ratio, names in sorted(by_ratio.items())) or "all at lr"


def _some(names, n: int = 4) -> str:
    names = sorted(names)
    return (", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")) or "none"


def _resume(path, model, optimizer, batch_rng, result, config) -> tuple[int, dict]:
    """Restore weights, AdamW moments, generator states and history from a checkpoint; return its step and
    metadata."""
    tensors, meta = read_checkpoint(path)
    check_resumable(path, meta, model, config)
    model.load_state_dict({n[len("model."):]: t for n, t in tensors.items() if n.startswith("model.")})
    names = {id(p): name for name, p in model.named_parameters()}
    for i, p in enumerate(optimizer.params):
        key = names[id(p)]
        if f"adamw.m.{key}" in tensors:
            optimizer.m[i] = backend.asarray(tensors[f"adamw.m.{key}"])
            optimizer.v[i] = backend.asarray(tensors[f"adamw.v.{key}"])
    optimizer.t = int(meta.get("adamw_t", 0))
    if meta.get("batch_rng"):
        batch_rng.bit_generator.state = meta["batch_rng"]
    generators = dropout_generators(model)
    states = meta.get("dropout_rngs", [])
    if len(states) != len(generators):
        raise ValueError(f"{path} holds {len(states)} dropout generator states; this model has {len(generators)}")
    for generator, state in zip(generators, states):
        if state is not None and rng_state(generator) is not None:
            generator.bit_generator.state = state
    history = meta.get("history", {})
    result.train = [list(x) for x in history.get("train", [])]
    result.val = [list(x) for x in history.get("val", [])]
    result.checkpoint = str(path)
    return int(meta["step"]), meta
