"""The ``minilora`` command. Thin: each subcommand calls the library and prints what it returns."""
from __future__ import annotations

import argparse
import math
import sys

from .core import backend
from .fast.allocator import tune_host_allocator_unless_disabled


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


def _bench(args) -> int:
    from . import bench
    from .core.model import GPTConfig

    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    result = bench.run(config, batch_size=args.batch_size, steps=args.steps, with_torch=not args.no_torch,
                       threads=args.threads, profile=not args.no_profile)
    print(bench.format_result(result))
    if args.json:
        from .io.files import write_json

        write_json(args.json, bench.as_dict(result))
        print(f"\nwrote {args.json}")
    if args.scaling:
        from pathlib import Path

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


def _pretrain(args) -> int:
    import math
    import shutil
    import time
    from pathlib import Path

    from . import data, train
    from .core.model import GPT, GPTConfig
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
        Path(args.export_to).mkdir(parents=True, exist_ok=True)
        for suffix in (".safetensors", ".json"):
            shutil.copyfile(Path(args.out) / f"{NAME}{suffix}", Path(args.export_to) / f"{NAME}{suffix}")
        print(f"exported to {args.export_to}")
    return 0


def _load_model(checkpoint, dropout=None):
    from .io.pretrained import load_pretrained
    from .train import load_checkpoint

    if checkpoint is None:
        return load_pretrained(dropout=dropout), "the shipped pretrained tiny GPT"
    return load_checkpoint(checkpoint)[0], checkpoint


def _sample(args) -> int:
    from . import tokenizer

    model, source = _load_model(args.checkpoint)
    prompt = tokenizer.encode(args.prompt)
    if prompt.size == 0:
        raise ValueError("the prompt is empty: give at least one character with --prompt")
    out = model.generate(prompt[None, -model.config.block_size:].astype("int64"), args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(tokenizer.decode(out[0]))
    return 0


def _eval(args) -> int:
    import math

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


def _finetune(args) -> int:
    from . import data, train
    from .core.lora import LoRAConfig
    from .core.methods import MethodSettings
    from .finetune import finetune

    settings = MethodSettings(lora=LoRAConfig(
        r=args.r, alpha=args.alpha if args.alpha is not None else 2.0 * args.r, targets=tuple(args.targets.split(",")),
        dropout=args.lora_dropout, use_rslora=args.rslora, init=args.init)) if args.method == "lora" else None
    lr = args.lr if args.lr is not None else (1e-3 if args.method == "full" else 1e-2)
    tc = train.TrainConfig.for_finetuning(args.steps, args.batch_size, lr,
                                          weight_decay=0.1 if args.method == "full" else 0.0,
                                          eval_every=args.eval_every, seed=args.seed, quiet=args.quiet)
    model, source = _load_model(args.checkpoint, dropout=args.dropout)
    corpus = data.load_corpus(args.corpus, args.text_source)
    print(f"fine-tuning {source} on {corpus.name!r} with {args.method}" + (f" ({settings.lora})" if settings else ""))
    plan = {1: args.latency_repeats, 32: max(1, args.latency_repeats // 4)} if args.latency_repeats else 0
    run = finetune(model, args.method, corpus, tc, out_dir=args.out, seed=args.seed, settings=settings,
                   latency_repeats=plan)
    bits = 1 / math.log(2)
    print(f"trainable {run.trainable:,} of {run.total:,} ({run.percent:.3f}%); validation "
          f"{run.val_before * bits:.4f} -> {run.val_after * bits:.4f} bits/char; step {1e3 * run.step_seconds:.1f} ms; "
          f"saved {run.saved_bytes / 1024:.1f} KB to {args.out}")
    for batch, t in run.latency_ms.items():
        # each ratio is the median [interquartile range] of the per-round ratio to the base model
        ratio = {name: "{:.3f}x [{:.3f}, {:.3f}]".format(*t["ratio"][name]) for name in ("unmerged", "merged")}
        if args.method == "lora":
            print(f"inference latency, batch {batch}: base {t['base']:.2f} ms; LoRA unmerged (two-step) "
                  f"{t['unmerged']:.2f} ms = {ratio['unmerged']} of base; merged {t['merged']:.2f} ms = "
                  f"{ratio['merged']} of base")
        else:
            print(f"inference latency, batch {batch}: base {t['base']:.2f} ms; fine-tuned {t['unmerged']:.2f} ms = "
                  f"{ratio['unmerged']} of base")
    return 0


def _tour(args) -> int:
    from .tour import TourConfig, run_tour

    config = TourConfig.quick(out_dir=args.out) if args.quick else TourConfig(out_dir=args.out, steps=args.steps)
    run_tour(config)
    return 0


def _compare(args) -> int:
    import time

    from .experiments import compare

    settings = compare.CompareSettings.fast() if args.fast else compare.CompareSettings()
    if args.seeds is not None:
        settings.seeds = tuple(range(args.seed, args.seed + args.seeds))
    elif args.seed:
        settings.seeds = tuple(args.seed + s for s in settings.seeds)
    methods = tuple(args.methods.split(",")) if args.methods else None
    t0 = time.perf_counter()
    result = compare.compare_methods(methods=methods, settings=settings, quiet=args.fast)
    print(compare.summary(result))
    paths = compare.save(result, args.out)
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {', '.join(str(p) for p in paths)}")
    return 0


def _experiment(args) -> int:
    import dataclasses
    import time
    from pathlib import Path

    from .experiments import study
    from .io.files import write_json

    module = study(args.name)
    out = Path(args.out or f"runs/experiments/{args.name}")
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
    parser = argparse.ArgumentParser(prog="minilora", description="LoRA from scratch on a hand-written tiny GPT-2.")
    parser.add_argument("--backend", choices=backend.BACKENDS, help="array backend (default: numpy, or $MINILORA_BACKEND)")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gradcheck", help="check every layer's backward against finite differences",
                       description="Check every functional layer and the whole GPT against centred differences in float64.")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_gradcheck)

    b = sub.add_parser("bench", help="time a training step against PyTorch eager",
                       description="Time one training step (forward, backward, AdamW) beside transformers' GPT-2.")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--n-layer", type=int, default=4)
    b.add_argument("--n-head", type=int, default=4)
    b.add_argument("--n-embd", type=int, default=128)
    b.add_argument("--block-size", type=int, default=128)
    b.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    b.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: all cores)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    b.add_argument("--no-profile", action="store_true", help="skip the per-layer breakdown")
    b.add_argument("--json", help="also write the results to this JSON file")
    b.add_argument("--scaling", metavar="DIR", help="also measure how the step grows with n_embd, block_size and "
                                                   "batch size (and attention memory with T); write DIR/scaling.png")
    b.set_defaults(func=_bench)

    p = sub.add_parser("pretrain", help="pretrain a tiny GPT on a corpus",
                       description="Pretrain a GPT on one of the shipped corpora; writes checkpoints "
                                   "and the weights-only model to --out.")
    p.add_argument("--out", default="runs/pretrain", help="output directory for checkpoints and the model")
    p.add_argument("--corpus", default="pydoc", choices=sorted(CORPORA), help="pretraining corpus (default: pydoc)")
    p.add_argument("--downstream", default="python-email", choices=sorted(CORPORA) + [""],
                   help="a corpus pretraining does not see, evaluated at the end ('' to skip)")
    _add_text_source(p)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    p.add_argument("--export-to", help="also copy the weights-only model here (e.g. minilora/pretrained)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_pretrain)

    s = sub.add_parser("sample", help="generate text from a model",
                       description="Generate text from a checkpoint (default: the shipped pretrained tiny GPT).")
    s.add_argument("--checkpoint", help="a checkpoint .safetensors (default: the shipped model)")
    s.add_argument("--prompt", default="The ")
    s.add_argument("--max-new-tokens", type=int, default=300)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_sample)

    e = sub.add_parser("eval", help="loss and bits per character of a model on a corpus",
                       description="Evaluate a checkpoint (default: the shipped model) on a corpus split.")
    e.add_argument("--checkpoint", help="a checkpoint .safetensors (default: the shipped model)")
    e.add_argument("--corpus", default="pydoc", choices=sorted(CORPORA))
    _add_text_source(e)
    e.add_argument("--split", choices=("train", "val"), default="val")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-batches", type=int, default=None, help="evaluate only the first N batches")
    e.set_defaults(func=_eval)

    from .finetune import SAVABLE_METHODS

    f = sub.add_parser("finetune", help="fine-tune the pretrained GPT with full fine-tuning or LoRA",
                       description="Fine-tune a checkpoint (default: the shipped model) on a corpus; saves the "
                                   "adapter (LoRA) or the weights (full) to --out.")
    f.add_argument("--method", choices=SAVABLE_METHODS, default="lora",
                   help="the methods whose result can be saved (minilora compare runs every method)")
    f.add_argument("--checkpoint", help="start from this checkpoint (default: the shipped model)")
    f.add_argument("--corpus", default="python-email", choices=sorted(CORPORA))
    _add_text_source(f)
    f.add_argument("--out", default="runs/finetune")
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--batch-size", type=int, default=16)
    f.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-2 LoRA, 1e-3 full)")
    f.add_argument("--r", type=int, default=4, help="LoRA rank")
    f.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 r)")
    f.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names, or all-linear")
    f.add_argument("--lora-dropout", type=float, default=0.0)
    f.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r)")
    f.add_argument("--init", choices=("default", "gaussian", "pissa"), default="default")
    f.add_argument("--dropout", type=float, default=0.0, help="the model's own dropout while fine-tuning")
    f.add_argument("--eval-every", type=int, default=50)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--latency-repeats", type=int, default=20,
                   help="after training, time inference at batch 1 (this many rounds) and 32 (a quarter): the base "
                        "model, LoRA unmerged and merged, taking turns; 0 skips it")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=_finetune)

    t = sub.add_parser("tour", help="the main job: full fine-tuning vs LoRA r=1,4,16 from the shipped model",
                       description="Fine-tune the shipped pretrained GPT on Python code with full fine-tuning and "
                                   "LoRA (r = 1, 4, 16 on Wq, Wv); print and save a comparison table and a plot.")
    t.add_argument("--out", default="runs/tour")
    t.add_argument("--steps", type=int, default=300, help="fine-tuning steps per method")
    t.add_argument("--quick", action="store_true", help="a few steps per method (a smoke test, under a minute)")
    t.set_defaults(func=_tour)

    from .experiments import STUDIES

    x = sub.add_parser("experiment", help="run a study from the LoRA paper at tiny scale",
                       description="Run one study, print its numbers, save result.json and plot.png. "
                                   f"Studies: {', '.join(STUDIES)}.")
    x.add_argument("name", choices=sorted(STUDIES))
    x.add_argument("--fast", action="store_true", help="a seconds-long version (for tests)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--out", help="output directory (default: runs/experiments/NAME)")
    x.set_defaults(func=_experiment)

    from .core.methods import METHODS

    c = sub.add_parser("compare", help="every fine-tuning method side by side (scores, costs, latency)",
                       description="Fine-tune the shipped model with every method over several seeds on the code "
                                   "domain (bits/char) and the prose-or-package classification task (accuracy); "
                                   "print the table of trainable parameters, scores, step time, memory, checkpoint "
                                   "size and inference latency at batch 1 and 32; write table.csv, result.json "
                                   f"and plot.png. Methods: {', '.join(METHODS)}.")
    c.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    c.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --fast)")
    c.add_argument("--seed", type=int, default=0, help="first seed")
    c.add_argument("--fast", action="store_true", help="a few steps per run (a smoke test, seconds)")
    c.add_argument("--out", default="runs/compare", help="output directory")
    c.set_defaults(func=_compare)

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
    args = build_parser().parse_args(argv)
    try:
        if args.backend:
            backend.use_backend(args.backend)
        if backend.fast_enabled():
            # a command owns its process, so it may make the process-wide allocator setting the fast path
            # gains from (the library itself never does; MINILORA_TUNE_MALLOC=0 keeps the command from it)
            tune_host_allocator_unless_disabled()
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, FloatingPointError) as exc:
        print(f"minilora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
