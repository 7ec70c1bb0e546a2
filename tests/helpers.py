"""Helpers shared by the tests: backend neutrality (the suite also runs with MINILORA_BACKEND=cupy) and the
protocol check the experiment studies' tests run their fast study under."""
import inspect

import pytest

from minilora import backend

host = backend.to_numpy            # any array -> NumPy, for comparisons on the host
dev = backend.asarray              # a NumPy array -> the selected backend (the GPU on CuPy)

numpy_only = pytest.mark.skipif(backend.current_backend() != "numpy",
                                reason="about NumPy itself (host arrays, CPU threads or exact CPU results)")


def record_protocol_runs(run, *, fast=True, **kwargs):
    """``run(fast=fast, **kwargs)`` (a study's ``run``) with every training run checked and recorded; returns
    (result, calls).

    common.run_lora and common.run_full are wrapped for the call: a selection-seed run scored on anything but
    dev, or a test run whose seed is not one of ``protocol.report_seeds(fast)``, raises at that call, so a leak
    fails where it happens even if no later count would notice it. ``fast`` goes to the study too, so the seeds
    checked are the ones of the mode it runs in. Each call is recorded as a dict: kind ("lora" or "full"),
    targets (a tuple; () for full), r (None for full), seed, part, lr, use_rslora (False for full), and the
    run's settings' steps and eval_every, and loraplus_ratio (None for plain LoRA and full), nf4 (True for QLoRA)."""
    # imported here: most test modules that use these helpers never train, and need not load the studies' code
    from minilora.experiments import common, protocol

    calls = []

    def checked(real, kind):
        # bound by the real signature, so a call records the same whether its arguments came by position or name
        signature = inspect.signature(real)

        def wrapper(*args, **kw):
            bound = signature.bind(*args, **kw)
            bound.apply_defaults()
            a = bound.arguments
            seed, part = a["seed"], a["part"]
            if seed == protocol.SELECTION_SEED and part != "dev":
                raise AssertionError(f"a selection run ({kind}) was scored on {part}")
            if part == "test" and seed not in protocol.report_seeds(fast):
                raise AssertionError(f"a {kind} run with seed {seed} was scored on test")
            calls.append({"kind": kind, "targets": tuple(a.get("targets", ())), "r": a.get("r"), "seed": seed,
                          "part": part, "lr": a["lr"], "use_rslora": a.get("use_rslora", False),
                          "loraplus_ratio": a.get("loraplus_ratio"), "nf4": a.get("nf4", False),
                          "steps": a["settings"].steps, "eval_every": a["settings"].eval_every})
            return real(*args, **kw)

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "run_lora", checked(common.run_lora, "lora"))
        patch.setattr(common, "run_full", checked(common.run_full, "full"))
        result = run(fast=fast, **kwargs)
    return result, calls
