"""Benchmark: one training step (forward, backward, AdamW) of minilora's GPT beside PyTorch eager.

The PyTorch side is transformers' GPT2LMHeadModel with the same config and thread count, timed in the same
run; torch and transformers are imported only here, only when asked for, and never by the library itself.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy

from . import backend
from .model import GPT, GPTConfig, cross_entropy
from .lora import LoRAConfig, apply_lora, merge_lora
from .optim import AdamW


def step_flops(config: GPTConfig, B: int, T: int) -> float:
    """Floating-point operations of one training step: 3x the forward's (backward costs twice the forward).

    Forward: 2 flops per multiply-add of every matrix product: the linear layers (12 C^2 per block), the
    tied output head (V C), and attention's two products q k^T and att v (2 T^2 C per sequence per block).
    """
    c = config
    N = B * T
    forward = 2 * N * (c.n_layer * 12 * c.n_embd ** 2 + c.vocab_size * c.n_embd) + c.n_layer * 4 * B * T * T * c.n_embd
    return 3.0 * forward


def _time(fn, steps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        backend.synchronize()
        t0 = time.perf_counter()
        fn()
        backend.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def minilora_step(config, B, seed=0, lora=None):
    """A closure running one minilora training step on random tokens (with LoRA adapters if ``lora``)."""
    model = GPT(config, seed=seed, dtype="float32")
    if lora is not None:
        apply_lora(model, lora)
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    rng = numpy.random.default_rng(seed)
    idx = backend.asarray(rng.integers(0, config.vocab_size, size=(B, config.block_size)))
    targets = backend.asarray(rng.integers(0, config.vocab_size, size=(B, config.block_size)))

    def step():
        logits = model.forward(idx)
        loss, dlogits = cross_entropy(logits, targets)
        model.backward(dlogits)
        opt.step()
        model.zero_grad()
        return loss

    return step


def torch_step(config, B, seed=0, threads=None):
    """A closure running the same step in PyTorch eager (transformers GPT2LMHeadModel + torch AdamW)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    hf = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                    n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=config.layer_norm_epsilon,
                    bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(hf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g)
    targets = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g)

    def step():
        logits = model(idx).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    return step


def breakdown(step, steps=3):
    """Where a minilora step spends its time: cProfile's cumulative time per functional layer and AdamW."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = {}
    total = 0.0
    for (filename, _, func), (_, _, tottime, cumtime, _) in stats.items():
        if func == "step" and filename.endswith("bench.py"):
            total = cumtime
        tracked = (filename.endswith("functional.py") and func.endswith(("_forward", "_backward", "cross_entropy"))) \
            or (filename.endswith("optim.py") and func == "step") \
            or (filename.endswith("model.py") and func == "_check_idx")
        if tracked:
            name = "AdamW.step" if func == "step" else func
            rows[name] = rows.get(name, 0.0) + cumtime
    rows["other (python glue, residual adds, sums)"] = max(0.0, total - sum(rows.values()))
    return {name: t / steps for name, t in sorted(rows.items(), key=lambda kv: -kv[1])}


@dataclass
class BenchResult:
    config: dict
    batch_size: int
    threads: int
    backend: str
    minilora_step_s: float
    minilora_tokens_per_s: float
    minilora_gflops: float
    torch_step_s: float | None = None
    torch_tokens_per_s: float | None = None
    ratio: float | None = None          # minilora time / torch time: <= 1.0 means as fast as PyTorch
    lora_step_s: float | None = None    # LoRA r=4 on Wq, Wv
    lora_ratio: float | None = None     # LoRA step / full fine-tuning step: goal <= 0.75
    inference_ms: dict = field(default_factory=dict)   # {"batch 1": {"base":, "lora unmerged":, "lora merged":}, ...}
    breakdown_s: dict = field(default_factory=dict)
    torch_note: str = ""


def run(config: GPTConfig | None = None, batch_size=32, steps=10, warmup=2, with_torch=True, threads=None,
        profile=True) -> BenchResult:
    config = config or GPTConfig()
    threads = threads or os.cpu_count()
    tokens = batch_size * config.block_size
    ours = _time(minilora_step(config, batch_size), steps, warmup)
    flops = step_flops(config, batch_size, config.block_size)
    result = BenchResult(config.to_dict(), batch_size, threads, backend.current_backend(), ours, tokens / ours,
                         flops / ours / 1e9)
    if with_torch:
        try:
            theirs = _time(torch_step(config, batch_size, threads=threads), steps, warmup)
            result.torch_step_s, result.torch_tokens_per_s, result.ratio = theirs, tokens / theirs, ours / theirs
        except ImportError as exc:
            result.torch_note = f"PyTorch reference skipped: {exc} (pip install 'minilora[reference]')"
    result.lora_step_s = _time(minilora_step(config, batch_size, lora=LoRAConfig(r=4, alpha=8)), steps, warmup)
    result.lora_ratio = result.lora_step_s / ours
    result.inference_ms = inference_latency(config)
    if profile:
        result.breakdown_s = breakdown(minilora_step(config, batch_size))
    return result


def inference_latency(config: GPTConfig, batch_sizes=(1, 32), repeats=20) -> dict:
    """Median forward time (ms) of the base model and of LoRA r=4 (Wq, Wv) unmerged and merged."""
    base = GPT(config, seed=0).eval()
    adapted = apply_lora(GPT(config, seed=0), LoRAConfig(r=4, alpha=8)).eval()
    merged = apply_lora(GPT(config, seed=0), LoRAConfig(r=4, alpha=8)).eval()
    merge_lora(merged)
    rng = numpy.random.default_rng(0)
    out = {}
    for B in batch_sizes:
        idx = backend.asarray(rng.integers(0, config.vocab_size, size=(B, config.block_size)))
        out[f"batch {B}"] = {name: 1e3 * _time(lambda m=m: m.forward(idx), repeats, 2)
                             for name, m in (("base", base), ("lora unmerged", adapted), ("lora merged", merged))}
    return out


def format_result(r: BenchResult) -> str:
    c = r.config
    lines = [
        f"training step: GPT n_layer={c['n_layer']} n_head={c['n_head']} n_embd={c['n_embd']} "
        f"block_size={c['block_size']} vocab={c['vocab_size']}, batch {r.batch_size}, float32, "
        f"{r.threads} threads, backend {r.backend}",
        "",
        f"{'':24}{'step (ms)':>12}{'tokens/s':>12}{'GFLOP/s':>10}",
        f"{'minilora (' + r.backend + ')':24}{r.minilora_step_s * 1e3:12.1f}{r.minilora_tokens_per_s:12.0f}"
        f"{r.minilora_gflops:10.1f}",
    ]
    if r.torch_step_s is not None:
        gflops = r.minilora_gflops * r.minilora_step_s / r.torch_step_s
        lines.append(f"{'PyTorch eager (HF GPT-2)':24}{r.torch_step_s * 1e3:12.1f}{r.torch_tokens_per_s:12.0f}{gflops:10.1f}")
        lines += ["", f"ratio minilora / PyTorch: {r.ratio:.2f}  (goal <= 1.00)"]
    elif r.torch_note:
        lines += ["", r.torch_note]
    if r.lora_step_s is not None:
        lines += [f"LoRA r=4 (Wq, Wv) step: {r.lora_step_s * 1e3:.1f} ms = {r.lora_ratio:.2f} of the full "
                  f"fine-tuning step (goal <= 0.75)"]
    for batch, times in r.inference_ms.items():
        base = times["base"]
        lines += [f"inference {batch}: base {base:.2f} ms, LoRA unmerged {times['lora unmerged']:.2f} ms "
                  f"({times['lora unmerged'] / base:.3f}x), merged {times['lora merged']:.2f} ms "
                  f"({times['lora merged'] / base:.3f}x, goal <= 1.02)"]
    if r.breakdown_s:
        total = sum(r.breakdown_s.values())
        lines += ["", "where a minilora step's time goes (cProfile, cumulative per function):"]
        lines += [f"  {name:44}{t * 1e3:8.1f} ms {100 * t / total:5.1f}%" for name, t in r.breakdown_s.items()]
    return "\n".join(lines)


def as_dict(r: BenchResult) -> dict:
    return asdict(r)
