"""Data parallelism over the CPU's cores: each thread runs its own replica of the model on a slice of the batch.

NumPy runs each elementwise operation (GELU, softmax, layernorm, the residual adds: a large share of a training
step) on one core; only matrix products spread over cores (in OpenBLAS). PyTorch runs both kinds on every core.
To use every core for everything without changing a line of the layer code, minilora splits the batch:

    thread k:  replica_k.forward(idx[slice_k]) -> loss_k;  replica_k.backward(w_k * dlogits_k)
    then:      model.grad = sum_k replica_k.grad             w_k = (tokens in slice k) / (tokens in the batch)

so the summed gradient is exactly the gradient of the mean loss over the whole batch (up to rounding: sums
happen in another order). A replica shares the model's weight arrays (no copy) but has its own caches and
gradients; NumPy releases Python's global interpreter lock inside its loops, so the threads really run at the
same time. Meanwhile BLAS is limited to one thread per call, so the threads do not fight over cores.

Dropout: each replica draws its masks from its own generators, reseeded every step from the model's own
generators, so a run is reproducible (and resumes exactly) for a given number of threads, but a run with 2
threads draws different masks from a run with 1.

On CuPy this is pointless (the GPU is already parallel): ``threads`` is 1 there.

This is part of the fast path: ``train.fit`` uses it when it runs more than one thread (by default on NumPy's
fast path); ``fit(TrainConfig(threads=1))`` and the reference core (``MINILORA_FAST=0``) run the plain loop,
``train.forward_backward``, which computes the same gradient on the whole batch at once.
"""
from __future__ import annotations

import copy
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy

from ..core import backend
from ..core.model import cross_entropy
from ..core.nn import dropout_generators


def _cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs a cgroup quota allows this process (cgroup v2 ``cpu.max`` "quota period", or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), or None where there is no quota."""
    def read(name):
        try:
            with open(os.path.join(root, name), encoding="ascii") as f:
                return f.read().split()
        except (OSError, UnicodeDecodeError):
            return None

    v2 = read("cpu.max")
    if v2 and len(v2) == 2 and v2[0] != "max":
        quota, period = v2
    else:
        quota, period = (read("cpu/cpu.cfs_quota_us") or [None])[0], (read("cpu/cpu.cfs_period_us") or [None])[0]
    try:
        quota, period = int(quota), int(period)
    except (TypeError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: the ones its affinity mask allows, capped by a cgroup CPU quota (a
    container limited to 2 CPUs on a 64-core host gets 2), at least 1. os.cpu_count() counts the host's."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):          # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, int(quota)))
    return max(1, cpus)


def default_threads(batch_size: int) -> int:
    """The CPUs this process may use on NumPy (never more threads than sequences in the batch); 1 on CuPy."""
    if backend.current_backend() != "numpy":
        return 1
    return max(1, min(usable_cpus(), batch_size))


class blas_threads:
    """``with blas_threads(n):`` BLAS runs at most n threads inside the block (threadpoolctl; nothing where it is
    missing). Evaluation runs under ``blas_threads(1)`` and the parallel step limits BLAS to one thread per worker:
    OpenBLAS otherwise runs a thread per core of the host, and beside another busy process those threads wait on
    each other for their turn on a core."""

    def __init__(self, n: int):
        self.n, self._limit = n, None

    def __enter__(self):
        controller = _blas_controller() if backend.current_backend() == "numpy" else None
        if controller is not None:
            self._limit = controller.limit(limits=self.n, user_api="blas")
        return self

    def __exit__(self, *exc):
        if self._limit is not None:
            self._limit.restore_original_limits()
            self._limit = None
        return False


@functools.lru_cache(maxsize=None)
def _blas_controller():
    """threadpoolctl's controller of the loaded BLAS libraries, or None when threadpoolctl is missing (then
    BLAS is not limited and the parallel step is merely slower)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


SLICE_TOKENS = 1024     # tokens per slice on NumPy: a (1024, 4C) float32 activation of the default model is 2 MB,
                        # so a slice's arrays stay near a core's L2 cache; much smaller slices pay Python's
                        # per-call overhead more often than they gain (``minilora bench`` shows the step time)


class ParallelStep:
    """``loss = ParallelStep(model, threads).forward_backward(idx, targets)``: the model's gradients of the mean
    cross-entropy over the batch, computed by ``threads`` replicas on slices of it. Build it once per training
    run (the replicas are made here, from the model as it is now: trainable flags and LoRA/adapter modules
    included).

    slice_tokens: each thread also cuts its share into slices of about this many tokens, run one after another
    (gradients accumulate): small arrays stay in the CPU's cache, which makes the step faster even on one
    thread. "auto": SLICE_TOKENS on NumPy, None on CuPy; None: one slice per thread.
    """

    def __init__(self, model, threads: int, slice_tokens="auto"):
        if isinstance(threads, bool) or not isinstance(threads, (int, numpy.integer)) or threads < 1:
            raise ValueError(f"threads must be an int >= 1; got {threads!r}")
        if isinstance(slice_tokens, str) and slice_tokens == "auto":
            slice_tokens = SLICE_TOKENS if backend.current_backend() == "numpy" else None
        if slice_tokens is not None and (isinstance(slice_tokens, bool) or not isinstance(slice_tokens, int)
                                         or slice_tokens < 1):
            raise ValueError(f"slice_tokens must be None or an int >= 1; got {slice_tokens!r}")
        self.model = model
        on_gpu = any(backend.get_array_module(p.data) is not numpy for p in model.parameters())
        self.threads = 1 if on_gpu else int(threads)      # a GPU runs each operation in parallel already
        self.slice_tokens = slice_tokens
        shared = {id(p.data): p.data for p in model.parameters()}          # the weights are not copied

        def memo():   # each replica gets new dropout generators (reseeded every step); replicas are CPU-only
            return {**shared, **{id(g): numpy.random.default_rng(0) for g in dropout_generators(model)}}

        self.replicas = [model] + [copy.deepcopy(model, memo()) for _ in range(self.threads - 1)]
        self._pairs = [list(zip(model.parameters(), r.parameters())) for r in self.replicas[1:]]
        self._generators = [list(zip(dropout_generators(model), dropout_generators(r))) for r in self.replicas[1:]]
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._blas = _blas_controller() if self.threads > 1 else None

    def forward_backward(self, idx, targets, ignore_index=None) -> float:
        """idx, targets: (B, T). Accumulates the gradient of the batch's mean loss into the model; returns the loss."""
        B, T = idx.shape
        n_slices = self.threads if self.slice_tokens is None else max(self.threads, -(-B * T // self.slice_tokens))
        n_slices = min(n_slices, B)
        if n_slices == 1:
            loss, dlogits = cross_entropy(self.model.forward(idx), targets, ignore_index)
            self.model.backward(dlogits)
            return loss
        bounds = numpy.linspace(0, B, n_slices + 1).astype(int)
        slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        counted = [self._counted(targets[s], ignore_index) for s in slices]
        total = sum(counted)
        if total == 0:
            raise ValueError("every target equals ignore_index: the mean cross-entropy over no tokens is undefined")
        for replica, generators in zip(self.replicas[1:], self._generators):
            replica.train(self.model.training)
            for own, theirs in generators:          # fresh streams each step, drawn from the model's generators
                theirs.bit_generator.state = numpy.random.default_rng(int(own.integers(2**62))).bit_generator.state

        def run(thread):
            replica, loss = self.replicas[thread], 0.0
            for k in range(thread, len(slices), self.threads):     # this thread's slices, one after another
                if counted[k] == 0:
                    continue
                part, dlogits = cross_entropy(replica.forward(idx[slices[k]]), targets[slices[k]], ignore_index)
                dlogits *= counted[k] / total      # the slice's share of the batch mean
                replica.backward(dlogits)
                loss += part * counted[k] / total
            return loss

        n_threads = min(self.threads, len(slices))
        if self._pool is None:
            losses = [run(0)]
        elif self._blas is None:
            losses = list(self._pool.map(run, range(n_threads)))
        else:
            with self._blas.limit(limits=1, user_api="blas"):
                losses = list(self._pool.map(run, range(n_threads)))
        for pairs in self._pairs:                  # model.grad += replica.grad
            for own, theirs in pairs:
                if theirs.grad is not None:
                    own.accumulate_grad(theirs.grad)
                    theirs.grad = None
        return float(sum(losses))

    @staticmethod
    def _counted(targets, ignore_index) -> int:
        return int(targets.size if ignore_index is None else (targets != ignore_index).sum())

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
