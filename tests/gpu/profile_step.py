"""Where a training step's time goes on the GPU: host (Python + launch) time against device time, per part.

Run by tests/gpu/check.sh on a machine with CuPy and a CUDA GPU:  python tests/gpu/profile_step.py [OUT_JSON]
For each of minilora full fine-tuning, minilora LoRA r=4 and PyTorch CUDA eager (transformers' GPT-2), it times
the whole step and its parts (forward, forward + backward, optimizer) with cupyx.profiler.benchmark, which reports
both the CPU time of a call and the GPU time between events around it. GPU time well under CPU time means the
step is bound by Python and kernel launches, not by the GPU's arithmetic.
"""
import json
import statistics
import sys

import cupy
import cupyx.profiler
import numpy

from minilora import backend, bench
from minilora.lora import LoRAConfig, apply_lora
from minilora.model import GPT, GPTConfig, cross_entropy
from minilora.optim import AdamW

backend.use_backend("cupy")
config, B = GPTConfig(), 32
rng = numpy.random.default_rng(0)
idx = backend.asarray(rng.integers(0, config.vocab_size, size=(B, config.block_size)))
targets = backend.asarray(rng.integers(0, config.vocab_size, size=(B, config.block_size)))


def timed(name, fn, n=30):
    r = cupyx.profiler.benchmark(fn, n_repeat=n, n_warmup=5)
    cpu, gpu = 1e3 * statistics.median(r.cpu_times), 1e3 * statistics.median(r.gpu_times[0])
    print(f"  {name:28} cpu {cpu:8.3f} ms   gpu {gpu:8.3f} ms")
    return {"cpu_ms": cpu, "gpu_ms": gpu}


def minilora_parts(lora):
    model = GPT(config, seed=0)
    if lora:
        apply_lora(model, LoRAConfig(r=4, alpha=8))
    opt = AdamW(model.parameters(), lr=1e-4)

    def forward():
        return model.forward(idx)

    def forward_backward():
        loss, dlogits = cross_entropy(model.forward(idx), targets)
        model.backward(dlogits)
        model.zero_grad()
        return loss

    def optimizer():
        opt.step()

    step = bench.minilora_step(config, B, lora=LoRAConfig(r=4, alpha=8) if lora else None, threads=1)
    forward_backward()                                    # gradients exist for the optimizer-only timing
    for p in model.parameters():
        if p.trainable and p.grad is None:
            p.grad = cupy.zeros_like(p.data)
    out = {"step": timed("step", step)}
    out["forward"] = timed("forward", forward)
    out["optimizer"] = timed("AdamW.step", optimizer)
    out["forward+backward"] = timed("forward+backward (+loss sync)", forward_backward)
    return out


def torch_parts():
    step = bench.torch_step(config, B)
    out = {"step": timed("step", step)}
    return out


result = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cupy": cupy.__version__}
print("minilora full fine-tuning (CuPy)")
result["minilora_full"] = minilora_parts(False)
print("minilora LoRA r=4 (CuPy)")
result["minilora_lora"] = minilora_parts(True)
print("PyTorch CUDA eager (HF GPT-2)")
result["torch"] = torch_parts()
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)
