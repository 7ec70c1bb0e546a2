"""Benchmark: one training step (forward, backward, AdamW) of minilora's GPT beside PyTorch eager.

The PyTorch side is transformers' GPT2LMHeadModel with the same config and thread count, timed in the same
run; torch and transformers are imported only here, only when asked for, and never by the library itself.
"""
from __future__ import annotations

import cProfile
import json
import math
import pstats
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy

from .core import backend
from .core.backend import use_fast
from .core.model import GPT, GPTConfig
from .core.lora import LoRAConfig, apply_lora, merge_lora
from .core.optim import AdamW
from .core.quant import quantize_base
from .fast.parallel import ParallelStep, default_threads, usable_cpus
from .timing import ratio_spread, spread, take_turns
from .train import forward_backward


def step_flops(config: GPTConfig, B: int, T: int) -> float:
    """Floating-point operations of one training step: 3x the forward's (backward costs twice the forward).

    Forward: 2 flops per multiply-add of every matrix product: the linear layers (12 C^2 per block), the
    tied output head (V C), and attention's two products q k^T and att v (2 T^2 C per sequence per block).
    """
    c = config
    N = B * T
    forward = 2 * N * (c.n_layer * 12 * c.n_embd ** 2 + c.vocab_size * c.n_embd) + c.n_layer * 4 * B * T * T * c.n_embd
    return 3.0 * forward


def _time(fn, steps, warmup) -> float:
    """Median seconds of fn over ``steps`` calls after ``warmup`` untimed ones."""
    return spread(take_turns([fn], steps, warmup)[0]).median


def minilora_step(config, B, seed=0, lora=None, threads=None, fast=True):
    """A closure running one minilora training step on random tokens (with LoRA adapters if ``lora``), as
    ``train.fit`` runs it: on the fast path split over ``threads`` data-parallel threads (None: every core; 1:
    the plain loop), or on the reference core (``fast=False``: the plain loop, as ``MINILORA_FAST=0`` runs it)."""
    model = GPT(config, seed=seed, dtype="float32")
    if lora is not None:
        apply_lora(model, lora)
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    rng = numpy.random.default_rng(seed)
    idx = backend.asarray(rng.integers(0, config.vocab_size, size=(B, config.block_size)))
    targets = backend.asarray(rng.integers(0, config.vocab_size, size=(B, config.block_size)))
    threads = (threads or default_threads(B)) if fast else 1
    parallel = ParallelStep(model, threads) if threads > 1 else None

    def step():
        with use_fast(fast):
            loss = forward_backward(model, idx, targets) if parallel is None else parallel.forward_backward(idx, targets)
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
    """Every figure of one benchmark run. Times are medians in seconds; ``spreads`` holds each timed figure's
    median and interquartile range; each ratio comes from the same samples as the two times beside it."""

    config: dict
    batch_size: int
    threads: int
    backend: str
    cpu: str
    blas: str
    minilora_step_s: float              # the fast path's full fine-tuning step
    minilora_tokens_per_s: float
    minilora_gflops: float
    torch_step_s: float | None = None
    torch_tokens_per_s: float | None = None
    ratio: float | None = None          # minilora step / torch step, the two taking turns: <= 1.0 means as fast
    lora_step_s: float | None = None    # LoRA r=4 on Wq, Wv (two-step forward)
    lora_ratio: float | None = None     # LoRA step / full fine-tuning step: goal <= 0.75
    dora_step_s: float | None = None    # DoRA r=4 on Wq, Wv
    dora_ratio: float | None = None     # DoRA step / LoRA step: goal <= 1.3
    torch_lora_step_s: float | None = None   # PEFT LoRA r=4 on c_attn
    lora_torch_ratio: float | None = None    # minilora LoRA step / PEFT LoRA step
    reference_step_s: float | None = None    # the reference core's full step (plain loop, MINILORA_FAST=0)
    reference_ratio: float | None = None     # reference step / fast step
    spreads: dict = field(default_factory=dict)          # {figure: {"median", "q1", "q3", "n"}}
    inference_ms: dict = field(default_factory=dict)     # {"batch 1": {"base":, "lora unmerged":, "lora merged":, "adapters":}, ...}
    inference_ratio: dict = field(default_factory=dict)  # the same / base, round by round with the base
    wide_config: dict = field(default_factory=dict)
    wide_inference_ms: dict = field(default_factory=dict)     # the same on a wide model (n_embd 1024)
    wide_inference_ratio: dict = field(default_factory=dict)
    matmul_peak_gflops: float | None = None
    breakdown_s: dict = field(default_factory=dict)
    torch_note: str = ""
    nf4_memory: dict = field(default_factory=dict)       # the frozen linear weights: float32 bytes against NF4
    load_memory: dict = field(default_factory=dict)      # loading a GPT-2 checkpoint: minilora beside transformers
    contention: dict = field(default_factory=dict)       # `minilora tour` alone and beside a busy process


def nf4_memory(config: GPTConfig, block_size: int = 64) -> dict:
    """Bytes of the frozen weights of every Linear (the blocks' q, k, v, o, fc, proj) in float32 and in NF4 (QLoRA's
    4-bit base) with and without double quantisation, counted from the arrays each stores; no timing."""
    out = {"block_size": block_size}
    for key, double in (("nf4", False), ("nf4 double quant", True)):
        quantised = quantize_base(GPT(config, seed=0, dtype="float32"), block_size, double)
        packed = [w for _, m in quantised.named_modules() for w in m.packed_weights().values()]
        out["numbers"] = sum(w.size for w in packed)
        out["float32"] = 4 * out["numbers"]                 # what the same weights take as float32 Parameters
        out[key] = sum(w.nbytes for w in packed)
        out[f"{key} / float32"] = out[key] / out["float32"]
        out[f"{key} bits per weight"] = 8 * out[key] / out["numbers"]
    return out


GPT2_124M = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def write_random_gpt2(path, config: GPTConfig = GPT2_124M, seed: int = 0) -> int:
    """Write a GPT-2 checkpoint of random float32 weights into the folder ``path`` (config.json and
    model.safetensors in transformers' layout, without minilora's integrity record), one tensor at a time, so
    that writing never holds more than one tensor; returns the weights' bytes."""
    from .io.files import write_json
    from .io.interop import hf_config, hf_tensor_shapes

    path = Path(path)
    shapes = {f"transformer.{name}": shape for name, shape in hf_tensor_shapes(config).items()}
    header, offset = {}, 0
    for name in sorted(shapes):
        nbytes = 4 * math.prod(shapes[name])
        header[name] = {"dtype": "F32", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    rng = numpy.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in sorted(shapes):
            values = rng.standard_normal(shapes[name], dtype=numpy.float32)
            values *= 0.02
            f.write(memoryview(values))
    write_json(path / "config.json", hf_config(config, "float32"))
    return offset


# Run in a fresh interpreter: argv = loader ("minilora" or "transformers"), checkpoint, tiny warm-up checkpoint.
# The peak is VmHWM, the high-water mark of this process's own memory, reset once the baseline is taken:
# ru_maxrss would not do, as a child started by fork and exec keeps the parent's peak in it.
_LOAD_MEMORY_SCRIPT = """
import json, sys, time

def memory():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")}

loader, path, warm = sys.argv[1:4]
if loader == "minilora":
    from minilora.io.interop import load_hf_gpt2
    load = lambda p: load_hf_gpt2(p, dtype="float32")
    weights = lambda model: [p.data for p in model.parameters()]
else:
    import torch
    from transformers import GPT2LMHeadModel
    load = lambda p: GPT2LMHeadModel.from_pretrained(p, dtype=torch.float32)
    weights = lambda model: [p.detach() for p in model.parameters()]
load(warm)                  # the loader's own code, imported lazily, is part of the interpreter's baseline
before = memory()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")        # reset VmHWM to the resident memory now
    reset = True
except OSError:
    reset = False           # VmHWM then also holds the imports' peak: the figure can only be too high
start = time.perf_counter()
model = load(path)
seconds = time.perf_counter() - start
after = memory()
total = sum(float(w.sum()) for w in weights(model))     # every weight read once, as a first forward reads them
print(json.dumps({"before": before, "after": after, "used": memory(), "seconds": seconds, "peak_reset": reset}))
"""


def _load_in_fresh_process(loader: str, path, warm) -> dict:
    """Run _LOAD_MEMORY_SCRIPT for ``loader`` in a new interpreter (NumPy backend) and return its figures."""
    import os
    import subprocess
    import sys

    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "MINILORA_BACKEND": "numpy",
           "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _LOAD_MEMORY_SCRIPT, loader, str(path), str(warm)], env=env,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"the {loader} load failed in its process: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_load_memory(config: GPTConfig = GPT2_124M, with_transformers: bool = True) -> dict:
    """Resident memory of loading a random GPT-2 checkpoint of ``config`` (float32) with minilora's load_hf_gpt2
    and with transformers' GPT2LMHeadModel.from_pretrained, each in a fresh interpreter after its imports and a
    warm-up load of a tiny checkpoint. For each loader, above that baseline, as multiples of the weights' bytes:
    "after" (resident memory once loaded), "peak" (its high-water mark during the load), "used" (resident
    memory once every weight has been read, as a first forward reads them: a loader that maps the file reads it
    only then) and "used_file" (the part of "used" that is the checkpoint's own pages mapped from the page
    cache); "seconds" the load's wall time. A loader that cannot run gets a "note" instead."""
    import importlib.util
    import tempfile
    import time

    out = {"config": config.to_dict()}
    with tempfile.TemporaryDirectory(prefix="minilora-load-memory-") as folder:
        start = time.perf_counter()
        weights = out["weights_bytes"] = write_random_gpt2(Path(folder) / "model", config)
        out["write_s"] = time.perf_counter() - start
        write_random_gpt2(Path(folder) / "warm", GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8), seed=1)
        missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
        for loader in ("minilora", "transformers"):
            if loader == "transformers" and not with_transformers:
                out[loader] = {"note": "skipped (PyTorch reference off)"}
                continue
            if loader == "transformers" and missing:
                out[loader] = {"note": f"not installed ({', '.join(missing)} cannot be imported)"}
                continue
            try:
                figures = _load_in_fresh_process(loader, Path(folder) / "model", Path(folder) / "warm")
            except RuntimeError as exc:
                if loader == "minilora":
                    raise
                out[loader] = {"note": str(exc)}
                continue
            before, after, used = figures["before"], figures["after"], figures["used"]
            out[loader] = {"after": (after["VmRSS"] - before["VmRSS"]) / weights,
                           "peak": (after["VmHWM"] - before["VmRSS"]) / weights,
                           "used": (used["VmRSS"] - before["VmRSS"]) / weights,
                           "used_file": sum(used[k] - before[k] for k in ("RssFile", "RssShmem")) / weights,
                           "seconds": figures["seconds"], "baseline_bytes": before["VmRSS"],
                           "peak_reset": figures["peak_reset"]}
    return out


def machine() -> tuple[str, str]:
    """(CPU model, BLAS library and kernel set), for the report: ratios move with both."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        blas = ", ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}, "
                         f"{i.get('num_threads')} threads)" for i in threadpool_info() if i.get("user_api") == "blas")
    except ImportError:
        blas = "unknown BLAS (threadpoolctl missing)"
    return cpu, blas or "no BLAS found"


def run(config: GPTConfig | None = None, batch_size=32, steps=10, warmup=2, with_torch=True, threads=None,
        profile=True, wide_n_embd: int | None = 1024, load_memory: GPTConfig | None = GPT2_124M) -> BenchResult:
    """Time the training step (fast path, reference core, LoRA, PyTorch eager and PEFT) and inference latency
    (base, LoRA unmerged and merged, adapters at batch 1 and 32, on ``config`` and on a ``wide_n_embd`` model);
    measure the memory of loading a GPT-2 checkpoint of the ``load_memory`` architecture (None: skip it)."""
    config = config or GPTConfig()
    threads = threads or usable_cpus()
    tokens = batch_size * config.block_size
    ours_threads = threads if backend.current_backend() == "numpy" else 1     # a GPU needs no CPU threads
    if backend.current_backend() == "cupy":
        # the first GPU calls compile kernels (NVRTC) and the GPU's clocks ramp up from idle: warm up longer
        warmup = max(warmup, 10)
    cpu, blas = machine()
    spreads = {}

    def pair(name_a, step_a, name_b, step_b, block=2):
        a, b = take_turns([step_a, step_b], -(-steps // block), warmup, block)
        spreads[name_a], spreads[name_b] = spread(a).to_dict(), spread(b).to_dict()
        spreads[f"{name_a} / {name_b}"] = ratio_spread(a, b).to_dict()
        return spread(a).median, spread(b).median, ratio_spread(a, b).median

    ours_step = minilora_step(config, batch_size, threads=ours_threads)
    lora_step = minilora_step(config, batch_size, lora=LoRAConfig(r=4, alpha=8), threads=ours_threads)
    lora, ours, lora_ratio = pair("lora step", lora_step, "full step (with lora)", ours_step)
    flops = step_flops(config, batch_size, config.block_size)
    result = BenchResult(config.to_dict(), batch_size, threads, backend.current_backend(), cpu, blas, ours,
                         tokens / ours, flops / ours / 1e9)
    result.lora_step_s, result.lora_ratio = lora, lora_ratio
    dora_step = minilora_step(config, batch_size, lora=LoRAConfig(r=4, alpha=8, use_dora=True), threads=ours_threads)
    result.dora_step_s, _, result.dora_ratio = pair("dora step", dora_step, "lora step (with dora)", lora_step)
    reference_step = minilora_step(config, batch_size, fast=False)
    result.reference_step_s, _, result.reference_ratio = pair(
        "reference step", reference_step, "full step (with reference)", ours_step, block=1)
    if with_torch:
        try:
            ours_again, theirs, result.ratio = pair("full step (with torch)", ours_step, "torch step",
                                                    torch_step(config, batch_size, threads=threads))
            result.minilora_step_s = ours_again           # the time printed beside the ratio is from its samples
            result.minilora_tokens_per_s, result.minilora_gflops = tokens / ours_again, flops / ours_again / 1e9
            result.torch_step_s, result.torch_tokens_per_s = theirs, tokens / theirs
            _, result.torch_lora_step_s, result.lora_torch_ratio = pair(
                "lora step (with peft)", lora_step, "peft lora step",
                torch_lora_step(config, batch_size, threads=threads))
        except ImportError as exc:
            result.torch_note = f"PyTorch reference skipped: {exc} (pip install 'minilora[reference]')"
    result.inference_ms, result.inference_ratio = inference_latency(config, spreads=spreads, label="")
    if wide_n_embd:
        wide = replace(config, n_embd=wide_n_embd, n_head=max(1, wide_n_embd // 64))
        result.wide_config = wide.to_dict()
        result.wide_inference_ms, result.wide_inference_ratio = inference_latency(wide, repeats=6, spreads=spreads,
                                                                                  label="wide ")
    result.matmul_peak_gflops = matmul_peak_gflops()
    result.nf4_memory = nf4_memory(config)
    result.spreads = spreads
    if profile:
        # cProfile sees only the calling thread: the breakdown is of a one-thread step
        result.breakdown_s = breakdown(minilora_step(config, batch_size, threads=1))
    if load_memory is not None:
        result.load_memory = measure_load_memory(load_memory, with_transformers=with_torch)
    return result


def inference_latency(config: GPTConfig, batch_sizes=(1, 32), repeats=20, spreads=None, label="") -> tuple[dict, dict]:
    """Forward time (ms) at each batch size of the base model, LoRA r=4 (Wq, Wv) unmerged (the two-step
    adapter) and merged, and adapters (m=4), all taking turns round by round on the same tokens; returns ({batch:
    {name: median ms}}, {batch: {name: median of the per-round ratio to the base}}), and fills ``spreads`` when
    given: each time's median and quartiles, and each ratio's median with its 95% interval (as q1, q3) and the
    verdict that interval supports (timing.latency_verdict)."""
    from .core.adapters import AdapterConfig, apply_adapters
    from .timing import latency_verdict, paired_forward_samples, ratio_interval

    models = {"base": GPT(config, seed=0),
              "lora unmerged": apply_lora(GPT(config, seed=0), LoRAConfig(r=4, alpha=8)),
              "lora merged": apply_lora(GPT(config, seed=0), LoRAConfig(r=4, alpha=8)),
              "adapters": apply_adapters(GPT(config, seed=0), AdapterConfig(bottleneck=4))}
    merge_lora(models["lora merged"])
    ms, ratio = {}, {}
    for B in batch_sizes:
        key = f"batch {B}"
        n = repeats * (5 if B == 1 else 1)
        samples = dict(zip(models, paired_forward_samples(list(models.values()), B, n)))
        ms[key] = {name: 1e3 * spread(t).median for name, t in samples.items()}
        intervals = {name: ratio_interval(t, samples["base"]) for name, t in samples.items() if name != "base"}
        ratio[key] = {name: interval.median for name, interval in intervals.items()}
        if spreads is not None:
            for name, t in samples.items():
                spreads[f"{label}inference {key} {name}"] = spread(t).scaled(1e3).to_dict()
            for name, interval in intervals.items():
                spreads[f"{label}inference {key} {name} / base"] = {**interval.to_dict(),
                                                                     "verdict": latency_verdict(interval)}
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


def _figure(r: BenchResult, name: str, unit_scale: float = 1e3, unit: str = " ms") -> str:
    """A timed figure as "median [q1, q3]" in the given unit (ratios: unit_scale 1, unit "x")."""
    s = r.spreads.get(name)
    if s is None:
        return "n/a"
    digits = 1 if unit == " ms" and s["median"] * unit_scale >= 10 else 2 if unit == " ms" else 3
    return f"{s['median'] * unit_scale:.{digits}f}{unit} [{s['q1'] * unit_scale:.{digits}f}, {s['q3'] * unit_scale:.{digits}f}]"


def _verdict(s: dict | None, goal: float) -> str:
    """Whether a ratio's interquartile range lies at or below the goal, above it, or straddles it."""
    if s is None:
        return ""
    if s["q3"] <= goal:
        return f"meets the goal <= {goal:g}"
    if s["q1"] > goal:
        return f"misses the goal <= {goal:g}"
    return f"not distinguishable from the goal <= {goal:g}"


def format_result(r: BenchResult) -> str:
    c = r.config
    lines = [
        f"training step: GPT n_layer={c['n_layer']} n_head={c['n_head']} n_embd={c['n_embd']} "
        f"block_size={c['block_size']} vocab={c['vocab_size']}, batch {r.batch_size}, float32, "
        f"{r.threads} threads, backend {r.backend}",
        f"machine: {r.cpu}; BLAS: {r.blas}",
        "each figure: median [interquartile range] over rounds taken in turn; a ratio is from the same rounds",
        "",
        f"{'':34}{'step (ms)':>12}{'tokens/s':>12}{'GFLOP/s':>10}",
        f"{'minilora fast path (' + r.backend + ')':34}{r.minilora_step_s * 1e3:12.1f}{r.minilora_tokens_per_s:12.0f}"
        f"{r.minilora_gflops:10.1f}",
    ]
    if r.torch_step_s is not None:
        gflops = r.minilora_gflops * r.minilora_step_s / r.torch_step_s
        lines.append(f"{'PyTorch eager (HF GPT-2)':34}{r.torch_step_s * 1e3:12.1f}{r.torch_tokens_per_s:12.0f}{gflops:10.1f}")
        lines += ["", f"minilora / PyTorch eager: {_figure(r, 'full step (with torch) / torch step', 1, 'x')}  "
                      f"(minilora {_figure(r, 'full step (with torch)')}, PyTorch {_figure(r, 'torch step')})"]
    elif r.torch_note:
        lines += ["", r.torch_note]
    if r.lora_step_s is not None:
        ratio = r.spreads.get("lora step / full step (with lora)")
        lines += [f"LoRA r=4 (Wq, Wv) / full fine-tuning step: {_figure(r, 'lora step / full step (with lora)', 1, 'x')} "
                  f"(LoRA {_figure(r, 'lora step')}, full {_figure(r, 'full step (with lora)')}): "
                  f"{_verdict(ratio, 0.75)}"]
    if r.dora_step_s is not None:
        lines += [f"DoRA r=4 (Wq, Wv) / LoRA r=4 step: {_figure(r, 'dora step / lora step (with dora)', 1, 'x')} "
                  f"(DoRA {_figure(r, 'dora step')}, LoRA {_figure(r, 'lora step (with dora)')}): "
                  f"{_verdict(r.spreads.get('dora step / lora step (with dora)'), 1.3)}"]
    if r.torch_lora_step_s is not None:
        lines += [f"minilora LoRA / PEFT LoRA r=4 (c_attn) step: {_figure(r, 'lora step (with peft) / peft lora step', 1, 'x')} "
                  f"(minilora {_figure(r, 'lora step (with peft)')}, PEFT {_figure(r, 'peft lora step')})"]
    if r.reference_step_s is not None:
        lines += [f"reference core (MINILORA_FAST=0, plain loop) / fast path step: "
                  f"{_figure(r, 'reference step / full step (with reference)', 1, 'x')} "
                  f"(reference {_figure(r, 'reference step')}, fast {_figure(r, 'full step (with reference)')})"]
    if r.matmul_peak_gflops:
        lines += [f"matrix-multiply peak of this machine (1024^3 sgemm): {r.matmul_peak_gflops:.0f} GFLOP/s; the "
                  f"minilora step reaches {100 * r.minilora_gflops / r.matmul_peak_gflops:.0f}% of it"]
    for label, ms, title in (("", r.inference_ms, f"n_embd {c['n_embd']}"),
                             ("wide ", r.wide_inference_ms, f"n_embd {r.wide_config.get('n_embd')}")):
        if not ms:
            continue
        lines += ["", f"inference latency, {title} (LoRA r=4 on Wq, Wv; unmerged = the two-step adapter; times: "
                      "median [quartiles]; ratios to the base: median of the per-round ratio [its 95% interval]):"]
        for batch in ms:
            parts = [f"base {_figure(r, f'{label}inference {batch} base', 1)}"]
            for name in ms[batch]:
                if name == "base":
                    continue
                ratio_name = f"{label}inference {batch} {name} / base"
                verdict = f" ({r.spreads[ratio_name]['verdict']})" if "verdict" in r.spreads.get(ratio_name, {}) else ""
                parts.append(f"{name} {_figure(r, f'{label}inference {batch} {name}', 1)} = "
                             f"{_figure(r, ratio_name, 1, 'x')} of base{verdict}")
            lines += [f"  inference {batch}: " + "; ".join(parts)]
    if r.nf4_memory:
        m = r.nf4_memory
        lines += ["", f"frozen linear weights ({m['numbers']:,} numbers), QLoRA's 4-bit NF4 base, blocks of "
                      f"{m['block_size']} (bytes stored):",
                  f"  float32 {m['float32']:,}; NF4 {m['nf4']:,} = {m['nf4 / float32']:.3f}x "
                  f"({m['nf4 bits per weight']:.3f} bits/weight); NF4 + double quantisation "
                  f"{m['nf4 double quant']:,} = {m['nf4 double quant / float32']:.3f}x "
                  f"({m['nf4 double quant bits per weight']:.3f} bits/weight)"]
    if r.load_memory:
        lines += [""] + format_load_memory(r.load_memory)
    if r.contention:
        lines += [""] + format_contention(r.contention)
    if r.breakdown_s:
        total = sum(r.breakdown_s.values())
        lines += ["", "where a one-thread minilora step's time goes (cProfile, cumulative per function):"]
        lines += [f"  {name:44}{t * 1e3:8.1f} ms {100 * t / total:5.1f}%" for name, t in r.breakdown_s.items()]
    return "\n".join(lines)


# what the other process does while the tour runs: spin in pure Python (one core, no BLAS), or multiply matrices
# (NumPy's BLAS, with as many threads as it takes)
BUSY_PROCESSES = {
    "a busy Python process": "while True:\n    pass\n",
    "a process multiplying matrices": "import numpy\na = numpy.ones((1024, 1024))\nwhile True:\n    a @ a\n",
}


def tour_under_load(tour_args=(), busy=tuple(BUSY_PROCESSES)) -> dict:
    """Wall seconds of ``minilora tour`` (in a fresh process, into a temporary folder) alone, then beside one other
    busy process of each kind in ``busy`` (started before the tour, killed after it), each as a multiple of the
    quiet time. tour_args: extra arguments of the tour (["--quick"] for a smoke test)."""
    import subprocess
    import sys
    import tempfile
    import time

    def tour_seconds(out):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "minilora", "tour", "--out", out, *tour_args], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        result = {"command": "minilora tour " + " ".join(tour_args), "cpus": usable_cpus(),
                  "quiet": tour_seconds(f"{tmp}/quiet")}
        for name in busy:
            other = subprocess.Popen([sys.executable, "-c", BUSY_PROCESSES[name]])
            try:
                seconds = tour_seconds(f"{tmp}/{len(result)}")
            finally:
                other.kill()
                other.wait()
            result[name] = {"seconds": seconds, "ratio": seconds / result["quiet"]}
    return result


def format_contention(m: dict, goal: float = 2.0) -> list:
    """The lines reporting tour_under_load's figures."""
    lines = [f"`{m['command'].strip()}` on {m['cpus']} usable CPUs, one run each: alone {m['quiet']:.0f} s"]
    for name, figure in m.items():
        if isinstance(figure, dict):
            verdict = "within" if figure["ratio"] <= goal else "beyond"
            lines.append(f"  beside {name}: {figure['seconds']:.0f} s = {figure['ratio']:.2f}x the quiet time "
                         f"({verdict} the goal <= {goal:g}x)")
    return lines


def format_load_memory(m: dict, goal: float = 1.2) -> list:
    """The lines reporting measure_load_memory's figures."""
    c = m["config"]
    lines = [f"loading a GPT-2 checkpoint (n_layer={c['n_layer']} n_embd={c['n_embd']} vocab={c['vocab_size']} "
             f"block_size={c['block_size']}), float32 weights {m['weights_bytes']:,} bytes, each loader in a fresh "
             "process:",
             "resident memory above the interpreter's (after imports and a warm-up load) in weights' bytes: after the "
             "load, its peak, and once every weight has been read (a first forward)",
             f"  {'':46}{'after':>7}{'peak':>7}{'read':>7}{'load s':>8}"]
    for loader, label in (("minilora", "minilora load_hf_gpt2"),
                          ("transformers", "transformers GPT2LMHeadModel.from_pretrained")):
        f = m.get(loader) or {"note": "not measured"}
        if "note" in f:
            lines.append(f"  {label:46}{f['note']}")
            continue
        text = f"  {label:46}{f['after']:6.2f}x{f['peak']:6.2f}x{f['used']:6.2f}x{f['seconds']:8.2f}"
        if loader == "minilora":
            text += f"  {'meets' if max(f['after'], f['peak']) <= goal else 'misses'} the goal <= {goal:g} (after, peak)"
        if f["used_file"] >= 0.05:
            text += f"  (read: {f['used_file']:.2f}x the checkpoint's file pages, mapped)"
        lines.append(text)
    return lines


def as_dict(r: BenchResult) -> dict:
    return asdict(r)
