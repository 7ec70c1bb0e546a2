"""Benchmark: one training step (forward, backward, AdamW) of minilora's GPT beside PyTorch eager.

The PyTorch side is transformers' GPT2LMHeadModel with the same config and thread count, timed in the same
run; torch and transformers are imported only here, only when asked for, and never by the library itself.
"""
from __future__ import annotations

import cProfile
import gc
import os
import pstats
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy

from .core import backend
from .core.model import GPT, GPTConfig
from .core.lora import LoRAConfig, apply_lora, merge_lora
from .core.optim import AdamW
from .fast.parallel import ParallelStep, default_threads


def step_flops(config: GPTConfig, B: int, T: int) -> float:
    """Floating-point operations of one training step: 3x the forward's (backward costs twice the forward).

    Forward: 2 flops per multiply-add of every matrix product: the linear layers (12 C^2 per block), the
    tied output head (V C), and attention's two products q k^T and att v (2 T^2 C per sequence per block).
    """
    c = config
    N = B * T
    forward = 2 * N * (c.n_layer * 12 * c.n_embd ** 2 + c.vocab_size * c.n_embd) + c.n_layer * 4 * B * T * T * c.n_embd
    return 3.0 * forward


def _timed(fn) -> float:
    """Seconds of one call of fn, the GPU's queued work included. Python's garbage collector is paused during
    the call, as timeit does: a collection set off by objects the other side of a pair made would land here."""
    backend.synchronize()
    collecting = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn()
        backend.synchronize()
        return time.perf_counter() - t0
    finally:
        if collecting:
            gc.enable()


def _time(fn, steps, warmup):
    """Median seconds of fn over ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(_timed(fn) for _ in range(steps))


def _time_pair(fn_a, fn_b, steps, warmup, block=2):
    """Median seconds of fn_a and of fn_b, timed in alternating blocks (a a a, b b b, a a a, ...): both see the
    same machine state (clock speed, other load), so their ratio is steadier than two separate measurements.
    The first call of each block is not timed: it would pay for the other side's worker threads, which keep
    spinning for a while after their last call (PyTorch's OpenMP pool does)."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    times_a, times_b = [], []
    for _ in range(max(1, -(-steps // block))):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            fn()
            times += [_timed(fn) for _ in range(block)]
    return statistics.median(times_a), statistics.median(times_b)


def minilora_step(config, B, seed=0, lora=None, threads=None):
    """A closure running one minilora training step on random tokens (with LoRA adapters if ``lora``), as
    ``train.fit`` runs it: split over ``threads`` data-parallel threads (None: every core, see parallel.py)."""
    model = GPT(config, seed=seed, dtype="float32")
    if lora is not None:
        apply_lora(model, lora)
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    rng = numpy.random.default_rng(seed)
    idx = backend.asarray(rng.integers(0, config.vocab_size, size=(B, config.block_size)))
    targets = backend.asarray(rng.integers(0, config.vocab_size, size=(B, config.block_size)))
    parallel = ParallelStep(model, threads or default_threads(B))

    def step():
        loss = parallel.forward_backward(idx, targets)
        opt.step()
        model.zero_grad()
        return loss

    return step


def _torch_device(torch):
    """PyTorch runs where minilora runs: CUDA when the backend is CuPy (and torch has CUDA), else the CPU.
    (Each step ends with loss.item(), which waits for the GPU, so the timings need no other synchronisation.)"""
    return "cuda" if backend.current_backend() == "cupy" and torch.cuda.is_available() else "cpu"


def torch_step(config, B, seed=0, threads=None, lora_r=None, lora_alpha=8):
    """A closure running the same step in PyTorch eager (transformers GPT2LMHeadModel + torch AdamW), on CUDA
    when minilora's backend is CuPy; with ``lora_r``, PEFT LoRA of that rank on the attention (c_attn)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    hf = GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                    n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=config.layer_norm_epsilon,
                    bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(hf)
    if lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules=["c_attn"],
                                                 fan_in_fan_out=True, lora_dropout=0.0))
    device = _torch_device(torch)
    model = model.train().to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g).to(device)
    targets = torch.randint(0, config.vocab_size, (B, config.block_size), generator=g).to(device)

    def step():
        logits = model(input_ids=idx).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().item()

    return step


def torch_lora_step(config, B, seed=0, threads=None, r=4, alpha=8):
    """The PyTorch LoRA step: PEFT LoRA r=4 on GPT-2's c_attn. GPT-2 joins Wq, Wk, Wv in that one matrix, so
    PEFT adapts all three (minilora's LoRA step adapts Wq and Wv): 1.5x minilora's adapter numbers."""
    return torch_step(config, B, seed, threads, lora_r=r, lora_alpha=alpha)


def matmul_peak_gflops(n=1024, repeats=5, dtype="float32") -> float:
    """The machine's own matrix-multiply speed: GFLOP/s of an n x n @ n x n product on the selected backend
    (best of the repeats), the ceiling every step's GFLOP/s is measured against."""
    xp = backend.xp()
    rng = numpy.random.default_rng(0)
    a = backend.asarray(rng.standard_normal((n, n)).astype(dtype))
    b = backend.asarray(rng.standard_normal((n, n)).astype(dtype))
    best = min(_time(lambda: xp.matmul(a, b), 1, 1 if i == 0 else 0) for i in range(repeats))
    return 2 * n ** 3 / best / 1e9


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
    ratio: float | None = None          # minilora time / torch time, the two taking turns: <= 1.0 means as fast
    lora_step_s: float | None = None    # LoRA r=4 on Wq, Wv
    lora_ratio: float | None = None     # LoRA step / full fine-tuning step: goal <= 0.75
    torch_lora_step_s: float | None = None   # PEFT LoRA r=4 on c_attn
    lora_torch_ratio: float | None = None    # minilora LoRA step / PEFT LoRA step
    inference_ms: dict = field(default_factory=dict)   # {"batch 1": {"base":, "lora unmerged":, "lora merged":, "adapters":}, ...}
    inference_ratio: dict = field(default_factory=dict)  # the same / base, measured taking turns with the base
    matmul_peak_gflops: float | None = None
    breakdown_s: dict = field(default_factory=dict)
    torch_note: str = ""


def run(config: GPTConfig | None = None, batch_size=32, steps=10, warmup=2, with_torch=True, threads=None,
        profile=True) -> BenchResult:
    config = config or GPTConfig()
    threads = threads or os.cpu_count()
    tokens = batch_size * config.block_size
    ours_threads = threads if backend.current_backend() == "numpy" else 1     # a GPU needs no CPU threads
    if backend.current_backend() == "cupy":
        # the first GPU calls compile kernels (NVRTC) and the GPU's clocks ramp up from idle: warm up longer
        warmup = max(warmup, 10)
    ours_step = minilora_step(config, batch_size, threads=ours_threads)
    lora_step = minilora_step(config, batch_size, lora=LoRAConfig(r=4, alpha=8), threads=ours_threads)
    ours, lora = _time_pair(ours_step, lora_step, steps, warmup)
    flops = step_flops(config, batch_size, config.block_size)
    result = BenchResult(config.to_dict(), batch_size, threads, backend.current_backend(), ours, tokens / ours,
                         flops / ours / 1e9)
    result.lora_step_s, result.lora_ratio = lora, lora / ours
    if with_torch:
        try:
            ours_again, theirs = _time_pair(ours_step, torch_step(config, batch_size, threads=threads), steps, warmup)
            result.torch_step_s, result.torch_tokens_per_s = theirs, tokens / theirs
            result.ratio = ours_again / theirs
            lora_again, theirs_lora = _time_pair(lora_step, torch_lora_step(config, batch_size, threads=threads),
                                                 steps, warmup)
            result.torch_lora_step_s, result.lora_torch_ratio = theirs_lora, lora_again / theirs_lora
        except ImportError as exc:
            result.torch_note = f"PyTorch reference skipped: {exc} (pip install 'minilora[reference]')"
    result.inference_ms, result.inference_ratio = inference_latency(config)
    result.matmul_peak_gflops = matmul_peak_gflops()
    if profile:
        # cProfile sees only the calling thread: the breakdown is of a one-thread step
        result.breakdown_s = breakdown(minilora_step(config, batch_size, threads=1))
    return result


def inference_latency(config: GPTConfig, batch_sizes=(1, 32), repeats=20) -> tuple[dict, dict]:
    """Forward time (ms) at each batch size of the base model, LoRA r=4 (Wq, Wv) unmerged and merged, and
    adapters (m=4): medians, each model taking turns with the base; returns ({batch: {name: ms}}, {batch:
    {name: ms / base ms}})."""
    from .core.adapters import AdapterConfig, apply_adapters
    from .finetune import paired_forward_latency

    base = GPT(config, seed=0)
    variants = {"lora unmerged": apply_lora(GPT(config, seed=0), LoRAConfig(r=4, alpha=8)),
                "lora merged": apply_lora(GPT(config, seed=0), LoRAConfig(r=4, alpha=8)),
                "adapters": apply_adapters(GPT(config, seed=0), AdapterConfig(bottleneck=4))}
    merge_lora(variants["lora merged"])
    ms, ratio = {}, {}
    for B in batch_sizes:
        key = f"batch {B}"
        n = repeats * (5 if B == 1 else 1)
        ms[key], ratio[key] = {}, {}
        for name, model in variants.items():
            base_s, model_s = paired_forward_latency([base, model], B, n)
            ms[key].setdefault("base", 1e3 * base_s)
            ms[key][name], ratio[key][name] = 1e3 * model_s, model_s / base_s
    return ms, ratio


def scaling(base: GPTConfig | None = None, batch_size: int = 8, n_embds=(64, 128, 256, 512),
            block_sizes=(32, 64, 128, 256, 512), batch_sizes=(1, 4, 16, 64), steps=3, warmup=1) -> dict:
    """How a training step's time grows with width, context and batch (one varied at a time from ``base``),
    and how many bytes one attention layer's cache holds against T (the (B, H, T, T) probabilities grow as
    T^2). Returns {"n_embd": [[value, seconds], ...], "block_size": ..., "batch_size": ..., "attention_bytes":
    [[T, bytes], ...]}."""
    from dataclasses import replace

    from .core.methods import activation_bytes

    base = base or GPTConfig()
    out = {"n_embd": [], "block_size": [], "batch_size": [], "attention_bytes": []}
    for C in n_embds:
        config = replace(base, n_embd=C, n_head=max(1, C // 32))
        out["n_embd"].append([C, _time(minilora_step(config, batch_size), steps, warmup)])
    for T in block_sizes:
        config = replace(base, block_size=T)
        out["block_size"].append([T, _time(minilora_step(config, batch_size), steps, warmup)])
        model = GPT(config, seed=0)
        attn = model.h[0].attn
        x = backend.asarray(numpy.zeros((batch_size, T, config.n_embd), dtype="float32"))
        attn.forward(x)
        out["attention_bytes"].append([T, activation_bytes(attn)])
    for B in batch_sizes:
        out["batch_size"].append([B, _time(minilora_step(base, B), steps, warmup)])
    return out


def plot_scaling(result: dict, path) -> None:
    """Log-log: step time against n_embd, block_size and batch size; attention cache bytes against T."""
    from .plots import new_figure, save_figure

    fig, axes = new_figure(1, 2, figsize=(12, 4.5))
    for key, marker in (("n_embd", "o"), ("block_size", "s"), ("batch_size", "^")):
        xs, ts = zip(*result[key])
        axes[0].loglog(xs, [1e3 * t for t in ts], marker=marker, label=f"against {key}")
    axes[0].set_xlabel("n_embd, block_size or batch size (others at the default)")
    axes[0].set_ylabel("training step (ms)")
    axes[0].legend()
    Ts, nbytes = zip(*result["attention_bytes"])
    axes[1].loglog(Ts, [b / 2**20 for b in nbytes], marker="o", label="measured")
    axes[1].loglog(Ts, [nbytes[-1] / 2**20 * (T / Ts[-1]) ** 2 for T in Ts], linestyle=":", label="~ T^2")
    axes[1].set_xlabel("T (block_size)")
    axes[1].set_ylabel("one attention layer's cache (MB)")
    axes[1].legend()
    save_figure(fig, path)


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
    if r.torch_lora_step_s is not None:
        lines += [f"PEFT LoRA r=4 (c_attn) step: {r.torch_lora_step_s * 1e3:.1f} ms; minilora LoRA / PEFT LoRA: "
                  f"{r.lora_torch_ratio:.2f}"]
    if r.matmul_peak_gflops:
        lines += [f"matrix-multiply peak of this machine (1024^3 sgemm): {r.matmul_peak_gflops:.0f} GFLOP/s; the "
                  f"minilora step reaches {100 * r.minilora_gflops / r.matmul_peak_gflops:.0f}% of it"]
    for batch, times in r.inference_ms.items():
        ratios = r.inference_ratio.get(batch, {})
        parts = ", ".join(f"{name} {ms:.2f} ms ({ratios[name]:.3f}x)" for name, ms in times.items() if name != "base")
        lines += [f"inference {batch}: base {times['base']:.2f} ms, {parts} (goal: merged <= 1.02x)"]
    if r.breakdown_s:
        total = sum(r.breakdown_s.values())
        lines += ["", "where a one-thread minilora step's time goes (cProfile, cumulative per function):"]
        lines += [f"  {name:44}{t * 1e3:8.1f} ms {100 * t / total:5.1f}%" for name, t in r.breakdown_s.items()]
    return "\n".join(lines)


def as_dict(r: BenchResult) -> dict:
    return asdict(r)
