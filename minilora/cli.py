"""The ``minilora`` command. Thin: each subcommand checks its command line, then calls the library and prints
what it returns.

Everything a command is given is checked before any data is loaded or a step is taken: each single value by
its argparse type (the validators below: ``integer``, ``real``, ``names``), paths, the environment and what
needs several arguments together by the subcommand's ``check`` function. Exit codes: 0 done (gradcheck: 1 when a
check fails); 2 a bad command line or environment, said in one line on stderr (``minilora CMD: error:
argument --lr: ...``); 1 the work failed while writing (disk full, permissions), said in one line, the earlier
files intact (every file is written atomically, see io/files.py).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from .core import backend
from .fast.allocator import tune_host_allocator

# ----------------------------------------------------------------------------------------------------
# the validators: argparse types for single values (a bad one ends the command in argparse's own words:
# "minilora pretrain: error: argument --lr: expected ...; got 'inf'", exit code 2)

FLOAT32_MAX = 3.4028234663852886e38    # training runs in float32: a larger number is infinite there
MAX_LR = 1.0          # AdamW moves every weight by about lr per step (whatever the gradient's size): the tiny GPT's
                      # weights are ~0.02 and the studies' learning-rate grids stop at 0.1, so lr > 1 can only
                      # diverge, and is a typo (1e1 for 1e-1) far more often than an experiment


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser with its errors in one line on stderr (no usage block above it): exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def integer(least: int = 1, most: int | None = None, note: str = ""):
    """An argparse type: an int in [least, most] (most None: no upper bound)."""
    expected = (f"an int in [{least}, {most}]" if most is not None else
                "a positive int" if least == 1 else f"an int >= {least}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"expected {expected}{note}; got {text!r}")
        return value
    return parse


def real(low: float, high: float, *, low_open: bool = False, high_open: bool = False, note: str = ""):
    """An argparse type: a finite number between low and high (each end included unless it is open)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (low < value if low_open else low <= value)
                and (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f"expected a finite number in {interval}{note}; got {text!r}")
        return value
    return parse


def names(what: str):
    """An argparse type: comma-separated names, none of them empty -> a tuple (whether each exists is for the
    subcommand's check to say, against the library's own list)."""
    def parse(text: str) -> tuple:
        items = tuple(item.strip() for item in text.split(","))
        if not all(items):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, none of them empty; got {text!r}")
        return items
    return parse


POSITIVE = integer(1)
COUNT = integer(0)
SEED = integer(0, note=" (NumPy's generators take non-negative seeds)")
LEARNING_RATE = real(0, MAX_LR, low_open=True, note=" (AdamW moves every weight by about lr per step)")
PROBABILITY = real(0, 1, high_open=True)
SCALE = real(0, FLOAT32_MAX, low_open=True, note=" (finite in float32, the precision training runs in)")


def temperature(text: str) -> float:
    """An argparse type: 0 (greedy: always the most likely token) or a number in [0.001, 100] (below that the
    scaled logits overflow; above it every token is about as likely as any other)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value == 0 or 1e-3 <= value <= 100):
        raise argparse.ArgumentTypeError(f"expected 0 (greedy: always the most likely token) or a number in "
                                         f"[0.001, 100]; got {text!r}")
    return value


# ----------------------------------------------------------------------------------------------------
# paths: checked by the subcommand's check, before any work (each raises a ValueError saying what is wrong)


def check_input_file(path) -> Path:
    """An existing, readable file."""
    if not str(path):
        raise ValueError("expected a file; got ''")
    p = Path(path)
    if not p.exists():
        raise ValueError(f"no such file: {path}")
    if p.is_dir():
        raise ValueError(f"{path} is a folder; expected a file")
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return p


def check_output_folder(path) -> None:
    """A folder that exists and takes files, or that can be created: tried by creating what is missing and a
    file in it, then removing all of it again (nothing is left behind)."""
    if not str(path):
        raise ValueError("expected a folder; got ''")
    p = Path(path)
    missing = []                     # the levels that do not exist yet, deepest first
    level = p
    while not os.path.lexists(level) and level != level.parent:
        missing.append(level)
        level = level.parent
    if not level.is_dir():
        where = "" if level == p else f"cannot create {path}: "
        raise ValueError(f"{where}{level} exists and is not a folder")
    created = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        fd, probe = tempfile.mkstemp(dir=p, prefix=".minilora-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        doing = "create the folder" if missing else "write into the folder"
        raise ValueError(f"cannot {doing} {path}: {exc.strerror or exc}") from None
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass


def check_output_file(path, suffix: str | None = None) -> None:
    """A file that can be written: not a folder, in a folder that takes files (or can be created)."""
    if not str(path):
        raise ValueError("expected a file name; got ''")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{path} is a folder; expected a file name")
    if suffix is not None and p.suffix != suffix:
        raise ValueError(f"expected a {suffix} file; got {path}")
    try:
        check_output_folder(p.parent)
    except ValueError as exc:
        raise ValueError(f"cannot write {path}: {exc}") from None


def check_checkpoint(path) -> None:
    """A minilora checkpoint (read by the library, which says what is wrong with a file that is not one)."""
    from .io.checkpoints import load_checkpoint

    check_input_file(path)
    try:
        load_checkpoint(path)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        message = str(exc)
        raise ValueError(message if str(path) in message else f"{path}: {message}") from None


def check_resumable(path) -> None:
    """A fine-tuning checkpoint to resume: intact (its integrity record), and one that records a fine-tuning run
    (the library checks that it is this run when it resumes)."""
    from .io.checkpoints import read_checkpoint

    check_input_file(path)
    try:
        _, meta = read_checkpoint(path)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        message = str(exc)
        raise ValueError(message if str(path) in message else f"{path}: {message}") from None
    if "finetune" not in meta:
        raise ValueError(f"{path} records no fine-tuning run (a pretraining checkpoint?); nothing to resume")


def argument(option: str, check, value, *extra) -> None:
    """``check(value)``, its ValueError said as argparse says a bad argument: "argument --out: ..."."""
    try:
        check(value, *extra)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"argument {option}: {exc}") from None


def check_environment(args) -> bool:
    """--backend or MINILORA_BACKEND, MINILORA_FAST and MINILORA_TUNE_MALLOC; returns whether the allocator may
    be tuned. Each bad value is a ValueError naming the variable, the value and what it may be."""
    if getattr(args, "backend", None):
        argument("--backend", backend.use_backend, args.backend)
    else:
        backend.xp().ndarray      # a MINILORA_BACKEND that names no usable backend raises its ValueError here
    backend.fast_enabled()        # MINILORA_FAST: the same
    return backend._flag(os.environ.get("MINILORA_TUNE_MALLOC", "1"), "the environment variable MINILORA_TUNE_MALLOC")


# ----------------------------------------------------------------------------------------------------
# running a command: check, then do; every failure in one line


def _one_line(message) -> str:
    return " ".join(str(message).split())


def _written(exc: OSError, args) -> str:
    """What a failed write was writing: the file the error names (the target of an atomic write rather than
    its temporary file), else the command's outputs."""
    from .io.files import TEMPORARY_SUFFIX

    named = getattr(exc, "filename2", None) or getattr(exc, "filename", None)
    if named:
        path = Path(os.fsdecode(named))
        temporary = re.fullmatch(r"\.(.+)\.[^.]+" + re.escape(TEMPORARY_SUFFIX), path.name)
        return str(path.parent / temporary.group(1)) if temporary else str(path)
    outputs = [str(getattr(args, name)) for name in ("out", "json", "gradescope", "gradescope_zip", "scaling",
                                                     "export_to") if getattr(args, name, None)]
    return " or ".join(outputs) or "the output"


def run(args, prog: str, tune_allocator: bool = True) -> int:
    """Check the environment and ``args`` (the subcommand's ``check``), then run ``args.func``.

    Returns the exit code: what the command returns; 2 for a bad command line or environment, or what the
    library refuses (ValueError and the like, said in one line); 1 when writing fails (any other OSError:
    disk full, permissions) or memory runs out."""
    try:
        tune = check_environment(args)
        if getattr(args, "check", None) is not None:
            args.check(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    try:
        if tune_allocator and tune and backend.fast_enabled():
            # a command owns its process, so it may make the process-wide allocator setting the fast path
            # gains from (the library itself never does; MINILORA_TUNE_MALLOC=0 keeps the command from it)
            tune_host_allocator()
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError) as exc:
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: could not write {_written(exc, args)}: {_one_line(exc.strerror or exc)}",
              file=sys.stderr)
        return 1
    except MemoryError:
        print(f"{prog}: error: out of memory (a smaller model, batch or block size needs less)", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------------------------------
# each subcommand's check (what needs paths, the library or several arguments together) and its work

def _check_model_shape(args) -> None:
    """n_embd divisible by n_head, and the rest of GPTConfig's own rules, before anything is built."""
    from .core.model import GPTConfig

    try:
        GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                  dropout=getattr(args, "dropout", 0.0))
    except ValueError as exc:
        raise ValueError(f"arguments --n-embd, --n-head: {exc}") from None


def _gradcheck(args) -> int:
    from .core import gradcheck

    print(f"minilora gradcheck: every layer's hand-written backward against centred differences (float64), "
          f"backend {backend.current_backend()}\n")
    results = (gradcheck.layer_checks(seed=args.seed) + gradcheck.method_layer_checks(seed=args.seed)
               + gradcheck.model_checks(seed=args.seed) + gradcheck.method_model_checks(seed=args.seed))
    print(gradcheck.format_table(results))
    failed = [r for r in results if not r.passed]
    worst = max(results, key=lambda r: r.rel_error)
    print(f"\n{len(results) - len(failed)}/{len(results)} checks pass (threshold {gradcheck.THRESHOLD:g}); "
          f"worst relative error {worst.rel_error:.2e} ({worst.layer}, {worst.param})")
    return 1 if failed else 0


def _check_bench(args) -> None:
    import importlib.util

    _check_model_shape(args)
    if not args.no_torch:
        missing = [m for m in ("torch", "transformers", "peft") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"argument --no-torch: the PyTorch reference needs {', '.join(missing)}, which cannot "
                             "be imported (pip install 'minilora[reference]'); or pass --no-torch")
    if args.json is not None:
        argument("--json", check_output_file, args.json)
    if args.scaling is not None:
        argument("--scaling", check_output_folder, args.scaling)


def _bench(args) -> int:
    from . import bench
    from .core.model import GPTConfig

    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    result = bench.run(config, batch_size=args.batch_size, steps=args.steps, with_torch=not args.no_torch,
                       threads=args.threads, profile=not args.no_profile)
    if args.contention:
        result.contention = bench.tour_under_load()
    print(bench.format_result(result))
    if args.json:
        from .io.files import write_json

        write_json(args.json, bench.as_dict(result))
        print(f"\nwrote {args.json}")
    if args.scaling:
        from .io.files import write_json

        grown = bench.scaling(config)
        out = Path(args.scaling)
        write_json(out / "scaling.json", grown)
        bench.plot_scaling(grown, out / "scaling.png")
        for key in ("n_embd", "block_size", "batch_size"):
            print(f"step time against {key}: " + ", ".join(f"{v}: {1e3 * t:.1f} ms" for v, t in grown[key]))
        print("attention cache against T: " + ", ".join(f"{T}: {b / 2**20:.1f} MB" for T, b in grown["attention_bytes"]))
        print(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")
    return 0


def _check_pretrain(args) -> None:
    from . import data
    from .io.checkpoints import CHECKPOINT_NAME

    _check_model_shape(args)
    for option, name in (("--corpus", args.corpus), ("--downstream", args.downstream)):
        if name:       # a window of block_size + 1 tokens must fit the validation text (a few ms to read)
            tokens = len(data.load_corpus(name, args.text_source).val)
            if args.block_size + 1 > tokens:
                raise ValueError(f"argument --block-size: {args.block_size} does not fit {option} {name}: its "
                                 f"validation text has {tokens:,} tokens, and a window takes block_size + 1")
    argument("--out", check_output_folder, args.out)
    if args.export_to is not None:
        argument("--export-to", check_output_folder, args.export_to)
    if args.resume:
        checkpoint = Path(args.out) / CHECKPOINT_NAME
        if not checkpoint.exists():
            raise ValueError(f"argument --resume: no checkpoint to resume from in --out {args.out} "
                             f"(no {checkpoint})")
        argument("--resume", check_checkpoint, checkpoint)


def _pretrain(args) -> int:
    import time

    from . import data, train
    from .core.model import GPT, GPTConfig
    from .io.files import write_bytes_atomic
    from .io.pretrained import NAME, export_pretrained

    corpus = data.load_corpus(args.corpus, args.text_source)
    downstream = data.load_corpus(args.downstream, args.text_source) if args.downstream else None
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                       dropout=args.dropout)
    model = GPT(config, seed=args.seed)
    tc = train.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                           warmup_steps=min(args.warmup_steps, args.steps), eval_every=args.eval_every,
                           checkpoint_every=args.checkpoint_every, out_dir=args.out, seed=args.seed, quiet=args.quiet)
    resume = Path(args.out) / train.CHECKPOINT_NAME if args.resume else None
    print(f"pretraining {model!r} on {corpus.name!r} ({len(corpus.train):,} training tokens), "
          f"{tc.steps} steps of {tc.batch_size} x {config.block_size} tokens")
    t0 = time.perf_counter()
    result = train.fit(model, corpus.train, corpus.val, tc, resume_from=resume,
                       meta={"corpus": corpus.name, "seed": args.seed})
    wall = time.perf_counter() - t0
    val = train.evaluate(model, corpus.val)
    last = [loss for _, loss in result.train[-50:]]
    meta = {
        "corpus": corpus.name, "corpus_source": corpus.source, "corpus_sha256": corpus.sha256,
        "seed": args.seed, "steps": tc.steps, "batch_size": tc.batch_size,
        "train_loss": sum(last) / len(last), "val_loss": val, "wall_seconds": wall,
        "tokens_per_second": result.tokens_per_second, "command": "minilora " + " ".join(sys.argv[1:]),
    }
    print(f"\n{corpus.name} validation: {val:.4f} nats/char = {val / math.log(2):.4f} bits/char")
    if downstream is not None:
        meta["downstream_corpus"], meta["downstream_corpus_sha256"] = downstream.name, downstream.sha256
        meta["downstream_val_loss"] = train.evaluate(model, downstream.val)
        print(f"{downstream.name} validation (unseen domain): {meta['downstream_val_loss']:.4f} nats/char = "
              f"{meta['downstream_val_loss'] / math.log(2):.4f} bits/char")
    weights = export_pretrained(model, meta, args.out)
    print(f"wall time {wall:.0f} s, {result.tokens_per_second:.0f} tokens/s; wrote {weights}")
    if args.export_to:
        for suffix in (".safetensors", ".json"):       # atomic copies: the shipped files are whole or untouched
            write_bytes_atomic(Path(args.export_to) / f"{NAME}{suffix}",
                               (Path(args.out) / f"{NAME}{suffix}").read_bytes())
        print(f"exported to {args.export_to}")
    return 0


def _load_model(checkpoint, dropout=None):
    from .io.pretrained import load_pretrained
    from .train import load_checkpoint

    if checkpoint is None:
        return load_pretrained(dropout=dropout), "the shipped pretrained tiny GPT"
    model = load_checkpoint(checkpoint)[0]
    if dropout is not None:
        model.set_dropout(dropout)
    return model, checkpoint


def _check_sample(args) -> None:
    if args.checkpoint is not None:
        argument("--checkpoint", check_checkpoint, args.checkpoint)
    if not args.prompt:
        raise ValueError("argument --prompt: expected at least one character; got ''")


def _sample(args) -> int:
    from . import tokenizer

    model, source = _load_model(args.checkpoint)
    prompt = tokenizer.encode(args.prompt)
    out = model.generate(prompt[None, -model.config.block_size:].astype("int64"), args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(tokenizer.decode(out[0]))
    return 0


def _check_eval(args) -> None:
    if args.checkpoint is not None:
        argument("--checkpoint", check_checkpoint, args.checkpoint)


def _eval(args) -> int:
    from . import data, train

    model, source = _load_model(args.checkpoint)
    corpus = data.load_corpus(args.corpus, args.text_source)
    ids = corpus.val if args.split == "val" else corpus.train
    loss = train.evaluate(model, ids, batch_size=args.batch_size, max_batches=args.max_batches)
    print(f"{source} on {corpus.name} ({args.split}, {len(ids):,} characters, {corpus.source} text "
          f"sha256 {corpus.sha256[:12]}): loss {loss:.6f} nats/char, {loss / math.log(2):.6f} bits/char")
    recorded = _recorded_val_loss(args, corpus) if args.split == "val" and args.max_batches is None else None
    if recorded is not None:
        print(f"recorded when the shipped model was exported: {recorded:.6f} nats/char "
              f"(difference {loss - recorded:+.1e})")
    return 0


def _recorded_val_loss(args, corpus):
    """The validation loss the shipped model's metadata records for this corpus, when this evaluation is the
    one that produced it (the shipped model, the whole validation split, the text it was measured on)."""
    from .io.pretrained import pretrained_info

    if args.checkpoint is not None:
        return None
    info = pretrained_info()
    for prefix in ("", "downstream_"):
        if info.get(f"{prefix}corpus") == corpus.name and info.get(f"{prefix}corpus_sha256") == corpus.sha256:
            return info.get(f"{prefix}val_loss")
    return None


LORA_OPTIONS = {"r": "--r", "alpha": "--alpha", "targets": "--targets", "lora_dropout": "--lora-dropout",
                "init": "--init", "rslora": "--rslora"}     # finetune's options that only LoRA has
LORA_DEFAULTS = {"r": 4, "targets": ("q_proj", "v_proj"), "lora_dropout": 0.0, "init": "default"}
LORA_METHODS = ("lora", "dora", "loraplus", "qlora")   # finetune's methods that take LORA_OPTIONS (LoRA's adapters)
RATIO = real(0, FLOAT32_MAX, low_open=True, note=" (lambda = eta_B / eta_A)")


def _check_finetune(args) -> None:
    from .core.lora import linear_modules

    if args.method not in LORA_METHODS:
        given = [option for dest, option in LORA_OPTIONS.items() if getattr(args, dest) not in (None, False)]
        if given:
            raise ValueError(f"argument {given[0]}: only LoRA has it, and --method is {args.method}")
    if args.loraplus_ratio is not None and args.method != "loraplus":
        raise ValueError(f"argument --loraplus-ratio: only LoRA+ has it (--method loraplus), and --method is "
                         f"{args.method}")
    if args.latency_repeats < 0:
        raise ValueError(f"argument --latency-repeats: expected an int >= 0 (latency_repeats: rounds of "
                         f"inference timing, 0 skips it); got {args.latency_repeats}")
    argument("--out", check_output_folder, args.out)
    if args.checkpoint is not None:
        argument("--checkpoint", check_checkpoint, args.checkpoint)
    if args.resume:
        from .train import CHECKPOINT_NAME

        argument("--resume", check_resumable, str(Path(args.out) / CHECKPOINT_NAME))
    if args.method in LORA_METHODS:
        # each target must name a linear layer of the model that is fine-tuned (its suffix or its full name), and
        # the rank must fit every layer it adapts
        layers = {name: lin for name, _, _, lin in linear_modules(_load_model(args.checkpoint)[0])}
        targets = args.targets or LORA_DEFAULTS["targets"]
        unknown = [t for t in targets if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in layers)]
        if unknown:
            raise ValueError(f"argument --targets: no Linear module matches {', '.join(map(repr, unknown))}; the "
                             f"model's are {', '.join(sorted({n.split('.')[-1] for n in layers}))} (or full names "
                             f"like {next(iter(layers))!r}), or all-linear")
        r = args.r or LORA_DEFAULTS["r"]
        for name, lin in layers.items():
            chosen = any(t == "all-linear" or name == t or name.endswith("." + t) for t in targets)
            if chosen and r > min(lin.weight.shape):
                raise ValueError(f"argument --r: rank {r} exceeds min(in, out) = {min(lin.weight.shape)} of {name} "
                                 f"{tuple(lin.weight.shape)}")


def _finetune(args) -> int:
    from . import data, train
    from .core.lora import LoRAConfig
    from .core.methods import MethodSettings, loraplus_config
    from .finetune import finetune

    lora = {**LORA_DEFAULTS, **{k: v for k, v in vars(args).items() if k in LORA_DEFAULTS and v is not None}}
    settings = MethodSettings(lora=LoRAConfig(
        r=lora["r"], alpha=args.alpha if args.alpha is not None else 2.0 * lora["r"], targets=lora["targets"],
        dropout=lora["lora_dropout"], use_rslora=args.rslora, init=lora["init"]),
        **({} if args.loraplus_ratio is None else {"loraplus_ratio": args.loraplus_ratio})) \
        if args.method in LORA_METHODS else None
    lr = args.lr if args.lr is not None else (1e-3 if args.method == "full" else 1e-2)
    checkpoints = args.checkpoint_every > 0 or args.resume
    tc = train.TrainConfig.for_finetuning(args.steps, args.batch_size, lr,
                                          weight_decay=0.1 if args.method == "full" else 0.0,
                                          eval_every=args.eval_every, seed=args.seed, quiet=args.quiet,
                                          checkpoint_every=args.checkpoint_every,
                                          out_dir=args.out if checkpoints else None)
    resume = Path(args.out) / train.CHECKPOINT_NAME if args.resume else None
    model, source = _load_model(args.checkpoint, dropout=args.dropout)
    corpus = data.load_corpus(args.corpus, args.text_source)
    described = loraplus_config(settings) if args.method == "loraplus" else settings.lora if settings else None
    print(f"fine-tuning {source} on {corpus.name!r} with {args.method}" + (f" ({described})" if described else ""))
    plan = {1: args.latency_repeats, 32: max(1, args.latency_repeats // 4)} if args.latency_repeats else 0
    run = finetune(model, args.method, corpus, tc, out_dir=args.out, seed=args.seed, settings=settings,
                   latency_repeats=plan, resume_from=resume)
    bits = 1 / math.log(2)
    print(f"trainable {run.trainable:,} of {run.total:,} ({run.percent:.3f}%); validation "
          f"{run.val_before * bits:.4f} -> {run.val_after * bits:.4f} bits/char; step {1e3 * run.step_seconds:.1f} ms; "
          f"saved {run.saved_bytes / 1024:.1f} KB to {args.out}")
    for batch, t in run.latency_ms.items():
        # each ratio: the median per-round ratio to the base model, its 95% interval, and what the interval says
        ratio = {name: "{:.3f}x [{:.3f}, {:.3f}] ({})".format(*t["ratio"][name], t["verdict"][name])
                 for name in ("unmerged", "merged")}
        if args.method in LORA_METHODS:
            print(f"inference latency, batch {batch}: base {t['base']:.2f} ms; LoRA unmerged (two-step) "
                  f"{t['unmerged']:.2f} ms = {ratio['unmerged']} of base; merged {t['merged']:.2f} ms = "
                  f"{ratio['merged']} of base")
        else:
            print(f"inference latency, batch {batch}: base {t['base']:.2f} ms; fine-tuned {t['unmerged']:.2f} ms = "
                  f"{ratio['unmerged']} of base")
    return 0


def _check_findings(args) -> None:
    if not Path(args.runs).is_dir():
        raise ValueError(f"argument --runs: {args.runs!r} is not a folder")
    if args.readme is not None and not Path(args.readme).is_file():
        raise ValueError(f"argument --readme: {args.readme!r} is not a file")


def _findings(args) -> int:
    from .experiments import findings

    text = findings.render(findings.collect(args.runs))
    print(text)
    if args.readme is not None:
        findings.update_readme(args.readme, text)
        print(f"\nwrote the table into {args.readme}")
    return 0


def _check_notebooks(args) -> None:
    from .notebooks import _requirements, find_notebooks

    args.paths = find_notebooks(args.names, args.dir)
    _requirements()
    if args.out is not None:
        argument("--out", check_output_folder, args.out)


def _notebooks(args) -> int:
    from .notebooks import run_notebook

    failed = 0
    for path in args.paths:
        run = run_notebook(path, short=args.short, out_dir=args.out)
        where = f"; wrote {run.written}" if run.written else ""
        print(f"{run.name:<32} {'passed' if run.passed else 'FAILED'} in {run.seconds:6.1f} s{where}", flush=True)
        if not run.passed:
            failed += 1
            print("    " + run.error.strip().replace("\n", "\n    ")[-3000:], flush=True)
    print(f"{len(args.paths) - failed} of {len(args.paths)} notebooks passed" + (" (short runs)" if args.short else ""))
    return 1 if failed else 0


def _check_tour(args) -> None:
    argument("--out", check_output_folder, args.out)


def _tour(args) -> int:
    from .tour import TourConfig, run_tour

    steps = {} if args.steps is None else {"steps": args.steps}
    # the quick tour prints its table too (the library's quick config is quiet, for tests)
    # (and times enough rounds of inference for the latency interval to say something)
    config = (TourConfig.quick(out_dir=args.out, quiet=False, latency_repeats=8, **steps) if args.quick
              else TourConfig(out_dir=args.out, **steps))
    run_tour(config)
    return 0


def _check_compare(args) -> None:
    from .core.methods import check_method

    if args.seeds is not None and args.seeds < 2:
        raise ValueError(f"argument --seeds: a 95% interval needs at least 2 reporting seeds; got {args.seeds}")
    if args.methods is not None:
        argument("--methods", lambda methods: [check_method(m) for m in methods], args.methods)
        twice = sorted({m for m in args.methods if args.methods.count(m) > 1})
        if twice:
            raise ValueError(f"argument --methods: {', '.join(map(repr, twice))} given more than once")
    argument("--out", check_output_folder, args.out)


def _compare(args) -> int:
    import time

    from .experiments import compare

    settings = compare.CompareSettings.fast() if args.fast else compare.CompareSettings()
    if args.seeds is not None:           # reporting seeds: never the selection seed 0
        settings.seeds = tuple(range(args.seed + 1, args.seed + 1 + args.seeds))
    elif args.seed:
        settings.seeds = tuple(args.seed + s for s in settings.seeds)
    t0 = time.perf_counter()
    result = compare.compare_methods(methods=args.methods, settings=settings, quiet=args.fast)
    print(compare.summary(result))
    paths = compare.save(result, args.out)
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    return 0


def _check_experiment(args) -> None:
    if args.out is None:
        args.out = f"runs/experiments/{args.name}"
    argument("--out", check_output_folder, args.out)


def _experiment(args) -> int:
    import dataclasses
    import time

    from .experiments import study
    from .io.files import write_json

    module = study(args.name)
    out = Path(args.out if args.out is not None else f"runs/experiments/{args.name}")
    t0 = time.perf_counter()
    result = module.run(fast=args.fast, seed=args.seed)
    wall = time.perf_counter() - t0
    print(module.summary(result))
    data = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result
    write_json(out / "result.json", {"experiment": args.name, "fast": args.fast, "seed": args.seed,
                                     "wall_seconds": wall, "result": data})
    module.plot(result, out / "plot.png")
    print(f"\n{wall:.0f} s; wrote {out / 'result.json'} and {out / 'plot.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .data import CORPORA
    from .tokenizer import VOCAB_SIZE

    parser = OneLineParser(prog="minilora", description="LoRA from scratch on a hand-written tiny GPT-2.")
    parser.add_argument("--backend", choices=backend.BACKENDS, help="array backend (default: numpy, or $MINILORA_BACKEND)")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gradcheck", help="check every layer's backward against finite differences",
                       description="Check every functional layer and the whole GPT against centred differences in float64.")
    g.add_argument("--seed", type=SEED, default=0)
    g.set_defaults(func=_gradcheck, check=None)

    b = sub.add_parser("bench", help="time a training step against PyTorch eager",
                       description="Time one training step (forward, backward, AdamW) beside transformers' GPT-2, and measure "
                                   "the memory of loading a GPT-2 124M checkpoint beside transformers' from_pretrained.")
    b.add_argument("--batch-size", type=POSITIVE, default=32)
    b.add_argument("--contention", action="store_true",
                   help="also time `minilora tour` alone and beside a busy process of each kind (several minutes)")
    b.add_argument("--n-layer", type=POSITIVE, default=4)
    b.add_argument("--n-head", type=POSITIVE, default=4)
    b.add_argument("--n-embd", type=POSITIVE, default=128)
    b.add_argument("--block-size", type=POSITIVE, default=128)
    b.add_argument("--steps", type=POSITIVE, default=10, help="timed steps (median reported)")
    b.add_argument("--threads", type=POSITIVE, default=None, help="PyTorch threads (default: all cores)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    b.add_argument("--no-profile", action="store_true", help="skip the per-layer breakdown")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.add_argument("--scaling", metavar="DIR", help="also measure how the step grows with n_embd, block_size and "
                                                   "batch size (and attention memory with T); write DIR/scaling.png")
    b.set_defaults(func=_bench, check=_check_bench)

    p = sub.add_parser("pretrain", help="pretrain a tiny GPT on a corpus",
                       description="Pretrain a GPT on one of the shipped corpora; writes checkpoints "
                                   "and the weights-only model to --out.")
    p.add_argument("--out", default="runs/pretrain", help="output directory for checkpoints and the model")
    p.add_argument("--corpus", default="pydoc", choices=sorted(CORPORA), help="pretraining corpus (default: pydoc)")
    p.add_argument("--downstream", default="python-email", choices=sorted(CORPORA) + [""],
                   help="a corpus pretraining does not see, evaluated at the end ('' to skip)")
    _add_text_source(p)
    p.add_argument("--steps", type=POSITIVE, default=1800)
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument("--lr", type=LEARNING_RATE, default=3e-3, help=f"peak learning rate, in (0, {MAX_LR:g}]")
    p.add_argument("--warmup-steps", type=COUNT, default=100, help="(at most --steps)")
    p.add_argument("--dropout", type=PROBABILITY, default=0.1, help="in [0, 1)")
    p.add_argument("--n-layer", type=POSITIVE, default=4)
    p.add_argument("--n-head", type=POSITIVE, default=4)
    p.add_argument("--n-embd", type=POSITIVE, default=128, help="a multiple of --n-head")
    p.add_argument("--block-size", type=POSITIVE, default=128)
    p.add_argument("--eval-every", type=COUNT, default=200, help="0: only at the end")
    p.add_argument("--checkpoint-every", type=COUNT, default=200, help="0: only at the end")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    p.add_argument("--export-to", help="also copy the weights-only model here (e.g. minilora/pretrained)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_pretrain, check=_check_pretrain)

    s = sub.add_parser("sample", help="generate text from a model",
                       description="Generate text from a checkpoint (default: the shipped pretrained tiny GPT).")
    s.add_argument("--checkpoint", help="a checkpoint .safetensors (default: the shipped model)")
    s.add_argument("--prompt", default="The ")
    s.add_argument("--max-new-tokens", type=POSITIVE, default=300)
    s.add_argument("--temperature", type=temperature, default=0.8,
                   help="0: always the most likely token; else in [0.001, 100] (default 0.8)")
    s.add_argument("--top-k", type=integer(1, VOCAB_SIZE), default=None,
                   help=f"sample among the k most likely tokens, k in [1, {VOCAB_SIZE}]")
    s.add_argument("--seed", type=SEED, default=0)
    s.set_defaults(func=_sample, check=_check_sample)

    e = sub.add_parser("eval", help="loss and bits per character of a model on a corpus",
                       description="Evaluate a checkpoint (default: the shipped model) on a corpus split.")
    e.add_argument("--checkpoint", help="a checkpoint .safetensors (default: the shipped model)")
    e.add_argument("--corpus", default="pydoc", choices=sorted(CORPORA))
    _add_text_source(e)
    e.add_argument("--split", choices=("train", "val"), default="val")
    e.add_argument("--batch-size", type=POSITIVE, default=32)
    e.add_argument("--max-batches", type=POSITIVE, default=None, help="evaluate only the first N batches")
    e.set_defaults(func=_eval, check=_check_eval)

    from .finetune import SAVABLE_METHODS

    f = sub.add_parser("finetune", help="fine-tune the pretrained GPT with full fine-tuning or LoRA",
                       description="Fine-tune a checkpoint (default: the shipped model) on a corpus; saves the "
                                   "adapter (LoRA) or the weights (full) to --out.")
    f.add_argument("--method", choices=SAVABLE_METHODS, default="lora",
                   help="the methods whose result can be saved (minilora compare runs every method); loraplus: "
                        "LoRA with lora_B at --loraplus-ratio times the learning rate")
    f.add_argument("--checkpoint", help="start from this checkpoint (default: the shipped model)")
    f.add_argument("--corpus", default="python-email", choices=sorted(CORPORA))
    _add_text_source(f)
    f.add_argument("--out", default="runs/finetune")
    f.add_argument("--steps", type=POSITIVE, default=300)
    f.add_argument("--batch-size", type=POSITIVE, default=16)
    f.add_argument("--lr", type=LEARNING_RATE, default=None,
                   help=f"peak learning rate, in (0, {MAX_LR:g}] (default: 1e-2 LoRA, 1e-3 full)")
    f.add_argument("--r", type=POSITIVE, default=None, help="LoRA rank (default 4)")
    f.add_argument("--alpha", type=SCALE, default=None, help="LoRA alpha (default: 2 r)")
    f.add_argument("--targets", type=names("module names"), default=None,
                   help="LoRA: comma-separated module names, or all-linear (default: q_proj,v_proj)")
    f.add_argument("--lora-dropout", type=PROBABILITY, default=None, help="LoRA: in [0, 1) (default 0)")
    f.add_argument("--rslora", action="store_true", help="LoRA: scale by alpha / sqrt(r)")
    f.add_argument("--loraplus-ratio", type=RATIO, default=None,
                   help="LoRA+ only (--method loraplus, which takes the LoRA options too): lora_B learns at this "
                        "multiple of --lr, every other trained parameter at --lr itself (default 16, the paper's "
                        "2^4); plain --method lora keeps one rate for all")
    f.add_argument("--init", choices=("default", "gaussian", "pissa"), default=None, help="LoRA (default: default)")
    f.add_argument("--dropout", type=PROBABILITY, default=0.0, help="the model's own dropout while fine-tuning")
    f.add_argument("--eval-every", type=COUNT, default=50, help="0: only before and after")
    f.add_argument("--seed", type=SEED, default=0)
    f.add_argument("--latency-repeats", type=int, default=20,
                   help="after training, time inference at batch 1 (this many rounds) and 32 (a quarter): the base "
                        "model, LoRA unmerged and merged, taking turns; 0 skips it")
    f.add_argument("--checkpoint-every", type=COUNT, default=50,
                   help="write a resumable checkpoint, --out/checkpoint.safetensors, every N steps and at the end; "
                        "0: none")
    f.add_argument("--resume", action="store_true",
                   help="continue the interrupted fine-tune from --out/checkpoint.safetensors; give the same "
                        "--checkpoint, --method, LoRA settings, --seed, --steps, --batch-size, --lr, --eval-every and "
                        "--dropout as the first run (anything else is refused)")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_finetune, check=_check_finetune)

    t = sub.add_parser("tour", help="the main job: full fine-tuning vs LoRA from the shipped model, on two tasks",
                       description="Fine-tune the shipped pretrained GPT with full fine-tuning, LoRA r = 1, 4, 16 on "
                                   "Wq, Wv and LoRA r = 16 on every linear layer, each at its recorded learning rate "
                                   "(tuned on dev), on Python code (bits/char) and on the prose-or-package "
                                   "classification task (accuracy), scored on test with one seed; print and save "
                                   "a comparison table, a plot and a one-line reading of the result.")
    t.add_argument("--out", default="runs/tour")
    t.add_argument("--steps", type=POSITIVE, default=None, help="language-modelling steps per row (default 200, "
                                                               "the steps the rates were tuned for; 6 with --quick)")
    t.add_argument("--quick", action="store_true", help="a few steps per method (a smoke test, under a minute)")
    t.set_defaults(func=_tour, check=_check_tour)

    from .experiments import STUDIES

    x = sub.add_parser("experiment", help="run a study from the LoRA paper at tiny scale",
                       description="Run one study, print its numbers, save result.json and plot.png. "
                                   f"Studies: {', '.join(STUDIES)}.")
    x.add_argument("name", choices=sorted(STUDIES))
    x.add_argument("--fast", action="store_true", help="a seconds-long version (for tests)")
    x.add_argument("--seed", type=SEED, default=0)
    x.add_argument("--out", help="output directory (default: runs/experiments/NAME)")
    x.set_defaults(func=_experiment, check=_check_experiment)

    fd = sub.add_parser("findings", help="the findings table, from the studies' result.json files",
                        description="Read RUNS/<study>/result.json for every study and print the findings table "
                                    "(the paper's number, ours with its 95%% interval, the verdict) and each run's "
                                    "wall time; with --readme, write it between the findings markers of that file.")
    fd.add_argument("--runs", default="runs/experiments", help="folder of the studies' outputs "
                                                               "(default: runs/experiments)")
    fd.add_argument("--readme", default=None, help="also write the table into this Markdown file, between its "
                                                   "'<!-- findings:begin -->' and '<!-- findings:end -->' lines")
    fd.set_defaults(func=_findings, check=_check_findings)

    from .core.methods import METHODS

    c = sub.add_parser("compare", help="every fine-tuning method side by side (scores, costs, latency)",
                       description="Fine-tune the shipped model with every method over several seeds on the code "
                                   "domain (bits/char) and the prose-or-package classification task (accuracy); "
                                   "print the table of trainable parameters, scores, step time, memory, checkpoint "
                                   "size and inference latency at batch 1 and 32; write table.csv, result.json "
                                   f"and plot.png. Methods: {', '.join(METHODS)}.")
    c.add_argument("--methods", type=names("methods"), help="comma-separated subset of the methods (default: all)")
    c.add_argument("--seeds", type=POSITIVE, default=None,
                   help="number of reporting seeds, at least 2 (default 3; 2 with --fast)")
    c.add_argument("--seed", type=SEED, default=0, help="the reporting seeds are SEED + 1, SEED + 2, ... (learning "
                                                        "rates are always chosen with seed 0, on dev)")
    c.add_argument("--fast", action="store_true", help="a few steps per run (a smoke test, seconds)")
    c.add_argument("--out", default="runs/compare", help="output directory")
    c.set_defaults(func=_compare, check=_check_compare)

    n = sub.add_parser("notebooks", help="run the teaching notebooks headless and report each",
                       description="Run the notebooks without a browser (a Jupyter kernel per notebook); print a line "
                                   "per notebook (passed or failed, seconds); exit 1 if any failed.")
    notebook_commands = n.add_subparsers(dest="notebooks_command", required=True)
    nr = notebook_commands.add_parser("run", help="run notebooks from top to bottom",
                                      description="Run notebooks from top to bottom; each asserts its own results.")
    nr.add_argument("names", nargs="*", help="notebooks whose file names start so (e.g. 03 04_lora); default: all")
    nr.add_argument("--dir", default=None, help="the notebooks folder (default: the repository's notebooks/)")
    nr.add_argument("--out", default=None, help="write the executed notebooks, outputs included, into this folder")
    nr.add_argument("--short", action="store_true", help="the quick versions (MINILORA_QUICK=1), as the tests run")
    nr.set_defaults(func=_notebooks, check=_check_notebooks)

    from .course.cli import add_subcommands as add_assignment_commands

    a = sub.add_parser("assignment", help="course assignments: build the student version, grade a submission",
                       description="Build student versions of the assignments (solutions cut out) and grade them.")
    add_assignment_commands(a.add_subparsers(dest="assignment_command", required=True))
    return parser


def _add_text_source(parser) -> None:
    from .data import SOURCES

    parser.add_argument("--text-source", choices=SOURCES, default="snapshot",
                        help="snapshot: the corpus text shipped with minilora, the same on every Python (default); "
                             "python: the running Python's own copy, for exploration (figures then differ a little "
                             "between Python builds)")


def main(argv=None) -> int:
    """Run one ``minilora`` command; returns its exit code (0 done, 2 a bad command line or environment, 1 a
    failed write). argparse's own exits (--help, a bad value for a type or a choice) raise SystemExit."""
    args = build_parser().parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "assignment_command", None))))
    return run(args, f"minilora {command}")


if __name__ == "__main__":
    sys.exit(main())
