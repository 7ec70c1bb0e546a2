"""The ``minilora`` command. Thin: each subcommand calls the library and prints what it returns."""
from __future__ import annotations

import argparse
import sys

from . import backend


def _gradcheck(args) -> int:
    from . import gradcheck

    print(f"minilora gradcheck: every layer's hand-written backward against centred differences (float64), "
          f"backend {backend.current_backend()}\n")
    results = gradcheck.layer_checks(seed=args.seed) + gradcheck.model_checks(seed=args.seed)
    print(gradcheck.format_table(results))
    failed = [r for r in results if not r.passed]
    worst = max(results, key=lambda r: r.rel_error)
    print(f"\n{len(results) - len(failed)}/{len(results)} checks pass (threshold {gradcheck.THRESHOLD:g}); "
          f"worst relative error {worst.rel_error:.2e} ({worst.layer}, {worst.param})")
    return 1 if failed else 0


def _bench(args) -> int:
    from . import bench
    from .model import GPTConfig

    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size)
    result = bench.run(config, batch_size=args.batch_size, steps=args.steps, with_torch=not args.no_torch,
                       threads=args.threads, profile=not args.no_profile)
    print(bench.format_result(result))
    if args.json:
        from .files import write_json

        write_json(args.json, bench.as_dict(result))
        print(f"\nwrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    b.set_defaults(func=_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.backend:
            backend.use_backend(args.backend)
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"minilora {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
