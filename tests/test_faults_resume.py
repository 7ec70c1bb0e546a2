"""Faults: every run resumes bit-identically after kill -9, and nothing non-finite or half-written is left.

The kill tests run a small training (pretraining, a LoRA fine-tune, a full fine-tune) as a subprocess that
checkpoints every step, SIGKILL it after seeded random delays, then resume it until it finishes: the final weights,
loss curves, scores and saved files must equal those of an uninterrupted run bit for bit, and no temporary file
of an interrupted atomic write may remain. The other tests inject a NaN or an absurd learning rate: training stops
with a FloatingPointError and the last checkpoint on disk stays byte-identical.
"""
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import minilora as ml
from minilora import data, finetune, tokenizer, train
from minilora.io.files import TEMPORARY_SUFFIX, load_safetensors

from helpers import host

REPO = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=16)

# one run, interrupted or not: the out dir is both fit's checkpoint folder and finetune's result folder; it resumes
# from out/checkpoint.safetensors when there is one, and writes final_weights.safetensors and final.json at the end
SCRIPT = r"""
import dataclasses, os, signal, sys
from pathlib import Path
import minilora as ml
from minilora import data, finetune, tokenizer, train
from minilora.io.files import save_safetensors, write_json

kind, out, dtype, steps, threads = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
TINY = dict(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=16)
if os.environ.get("KILL_AT_RENAME"):      # SIGKILL itself at that rename of an atomic write: a file fully written
    real_replace, renames = os.replace, []  # to its temporary, never renamed over the target

    def replace_or_die(*args, **kwargs):
        renames.append(args)
        if len(renames) == int(os.environ["KILL_AT_RENAME"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(*args, **kwargs)

    os.replace = replace_or_die
dropout = 0.1 if ml.current_backend() == "numpy" else 0.0     # CuPy's dropout generators have no state to save
checkpoint = out / train.CHECKPOINT_NAME
resume = checkpoint if checkpoint.exists() else None
config = train.TrainConfig(steps=steps, batch_size=4, block_size=16, warmup_steps=2, eval_every=4, eval_batches=1,
                           checkpoint_every=1, out_dir=str(out), quiet=True, seed=3, threads=threads,
                           weight_decay=0.0 if kind == "lora" else 0.1)
text = data.toy_text("reverse", 300, seed=0)
print("training", flush=True)
if kind == "pretrain":
    model = ml.GPT(ml.GPTConfig(**TINY, dropout=dropout), seed=0, dtype=dtype)
    ids = tokenizer.encode(text)
    result = train.fit(model, ids, ids, config, resume_from=resume)
    final = {"train": result.train, "val": result.val, "steps": result.steps}
else:
    model = ml.GPT(ml.GPTConfig(**TINY), seed=1, dtype=dtype)       # the "pretrained" base
    ids = tokenizer.encode(text)
    corpus = data.Corpus("toy-reverse", "toy", text, ids[:2000], ids[2000:])
    settings = ml.MethodSettings(lora=ml.LoRAConfig(r=2, alpha=4.0, dropout=dropout))
    run = finetune.finetune(model, kind, corpus, config, out_dir=out, latency_repeats=0, eval_batches=2, seed=5,
                            settings=settings, resume_from=resume)
    final = {k: v for k, v in dataclasses.asdict(run).items() if k not in ("step_seconds", "latency_ms")}
save_safetensors({n: p.data for n, p in model.named_parameters()}, out / "final_weights.safetensors")
write_json(out / "final.json", final)
print("done", flush=True)
"""

# kind -> (dtype, steps, data-parallel threads, kills)
KILL_RUNS = {
    "pretrain": ("float32", 40, 2, 3),
    "lora": ("float64", 40, 1, 3),
    "full": ("float32", 40, 1, 3),
}


def _start(kind, out, log, kill_at_rename=None):
    dtype, steps, threads, _ = KILL_RUNS[kind]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("KILL_AT_RENAME", None)
    if kill_at_rename:
        env["KILL_AT_RENAME"] = str(kill_at_rename)
    return subprocess.Popen([sys.executable, "-c", SCRIPT, kind, str(out), dtype, str(steps), str(threads)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)


def _wait_for_training(process, log_path):
    line = process.stdout.readline()
    if line.strip() != "training":
        process.wait(timeout=60)
        raise AssertionError(f"the run did not start: {line!r}\n{Path(log_path).read_text()}")


def _run_to_the_end(kind, out) -> float:
    """Run (or resume) to the end without a kill; the seconds from the start of training to the end."""
    log_path = out.parent / f"{out.name}.log"
    with open(log_path, "a") as log:
        process = _start(kind, out, log)
        _wait_for_training(process, log_path)
        t0 = time.perf_counter()
        rest, _ = process.communicate(timeout=120)
        seconds = time.perf_counter() - t0
    assert process.returncode == 0 and rest.strip() == "done", Path(log_path).read_text()
    return seconds


def _checkpoint_step(out) -> int:
    path = out / train.CHECKPOINT_NAME
    return train.read_checkpoint(path)[1]["step"] if path.exists() else 0


def _step_on_disk(out) -> int:
    """The step of the checkpoint's readable copy (written right after the checkpoint, atomically); 0: none."""
    try:
        return json.loads((out / "checkpoint.json").read_text())["step"]
    except FileNotFoundError:
        return 0


def _wait_for_progress(process, out, step, timeout=60.0) -> None:
    """Wait until the run has written a checkpoint after ``step`` (or has ended)."""
    deadline = time.perf_counter() + timeout
    while process.poll() is None and _step_on_disk(out) <= step:
        assert time.perf_counter() < deadline, "the run made no progress"
        time.sleep(0.002)


def _final(out):
    weights, _ = load_safetensors(out / "final_weights.safetensors")
    return weights, json.loads((out / "final.json").read_text())


@pytest.mark.parametrize("kind", list(KILL_RUNS))
def test_kill_9_at_random_moments_then_resume_is_bit_identical(kind, tmp_path):
    dtype, steps, _, kills = KILL_RUNS[kind]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    seconds = _run_to_the_end(kind, reference)

    rng = random.Random(f"kill-9 {kind}")            # seeded delays: the same plan on every run of the test
    step_seconds = seconds / steps
    mid_run, half_written, progress = 0, 0, []
    log_path = tmp_path / "killed.log"
    with open(log_path, "a") as log:
        # first a kill in the middle of an atomic write: each checkpoint renames its safetensors, then its JSON
        written = rng.randint(3, 10)
        process = _start(kind, killed, log, kill_at_rename=2 * written + 1)
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL, Path(log_path).read_text()
        assert _checkpoint_step(killed) == written and len(_temporaries(killed)) == 1     # the last one intact
        for _ in range(kills):                           # then kills at random moments
            start = _checkpoint_step(killed)
            process = _start(kind, killed, log)
            _wait_for_training(process, log_path)
            _wait_for_progress(process, killed, start)       # training is under way: kill it anywhere in what is left
            time.sleep(rng.uniform(0.0, step_seconds * (steps - start) / 2))
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=60)
            progress.append(_checkpoint_step(killed))
            mid_run += progress[-1] < steps
            half_written += any(p.name.endswith(TEMPORARY_SUFFIX) for p in killed.iterdir())
    assert mid_run >= 1, f"no kill landed before the run finished (checkpoint steps {progress})"
    # a temporary left by a write killed halfway (planted too, so the clean-up is always exercised)
    (killed / f".{train.CHECKPOINT_NAME}.planted{TEMPORARY_SUFFIX}").write_bytes(b"half a checkpoint")
    _run_to_the_end(kind, killed)
    print(f"\n{kind}: a kill mid-write at checkpoint {written + 1}, then {mid_run} of {kills} random kills landed mid-run (checkpoint step after each: {progress} of {steps}; "
          f"{half_written} left a half-written temporary); reference run {seconds:.2f} s")

    assert not [p.name for p in killed.iterdir() if p.name.endswith(TEMPORARY_SUFFIX)]
    want_weights, want = _final(reference)
    got_weights, got = _final(killed)
    assert got == want                                   # losses, curves, scores: exact floats
    assert set(got_weights) == set(want_weights)
    for name, array in want_weights.items():
        assert got_weights[name].dtype == array.dtype and np.array_equal(got_weights[name], array), name
    saved = {"lora": (ml.lora.ADAPTER_WEIGHTS, ml.lora.ADAPTER_CONFIG), "full": ("model.safetensors", "model.json")}
    if kind in saved:                                   # what finetune saved
        weights, readable = saved[kind]
        assert (killed / readable).read_bytes() == (reference / readable).read_bytes()
        # every tensor bit for bit and the same header metadata; not the file's bytes: safetensors writes the
        # metadata entries in the order of a Rust HashMap, which changes from one process to the next
        (want_tensors, want_header), (got_tensors, got_header) = (load_safetensors(d / weights)
                                                                  for d in (reference, killed))
        assert got_header == want_header and set(got_tensors) == set(want_tensors)
        for name, array in want_tensors.items():
            assert got_tensors[name].dtype == array.dtype and np.array_equal(got_tensors[name], array), name
    assert _checkpoint_step(killed) == steps


# ----------------------------------------------------------------------------------------------------
# in-process: non-finite values, refused resumes, stale temporaries


def _toy_corpus():
    text = data.toy_text("reverse", 300, seed=0)
    ids = tokenizer.encode(text)
    return data.Corpus("toy-reverse", "toy", text, ids[:2000], ids[2000:])


def _config(out_dir, **overrides):
    fields = dict(steps=6, batch_size=4, block_size=16, warmup_steps=1, eval_every=2, eval_batches=1,
                  checkpoint_every=1, out_dir=str(out_dir) if out_dir else None, quiet=True, seed=3, threads=1)
    return train.TrainConfig(**{**fields, **overrides})


def _temporaries(directory):
    return [p.name for p in Path(directory).iterdir() if p.name.endswith(TEMPORARY_SUFFIX)]


def test_a_nan_parameter_stops_training_before_the_checkpoint_is_overwritten(tmp_path):
    model = ml.GPT(ml.GPTConfig(**TINY), seed=0, dtype="float64")
    ids = tokenizer.encode(data.toy_text("reverse", 300, seed=0))
    name = "h.1.mlp.fc.weight"
    path = tmp_path / train.CHECKPOINT_NAME
    on_disk = {}

    def validate(m):               # called after each step's update, before its checkpoint
        step = len(on_disk) + 1
        on_disk[step] = (path.read_bytes(), path.with_suffix(".json").read_bytes()) if path.exists() else None
        if step == 3:
            dict(m.named_parameters())[name].data[0, 0] = float("nan")
        return 0.0

    with pytest.raises(FloatingPointError) as error:
        train.fit(model, config=_config(tmp_path, eval_every=1), validate=validate,
                  batches=lambda rng: data.get_batch(ids, 4, 16, rng))
    message = str(error.value)
    assert f"parameter {name} holds 1 non-finite value (nan/inf) after step 3" in message
    assert f"the last checkpoint ({path}) is untouched" in message
    assert (path.read_bytes(), path.with_suffix(".json").read_bytes()) == on_disk[3]      # step 2's, byte for byte
    assert train.read_checkpoint(path)[1]["step"] == 2 and not _temporaries(tmp_path)


@pytest.mark.filterwarnings("ignore:.*(overflow|invalid value):RuntimeWarning")
def test_an_absurd_learning_rate_stops_a_fine_tune_and_leaves_the_last_run_on_disk(tmp_path):
    corpus = _toy_corpus()

    def run(lr):
        model = ml.GPT(ml.GPTConfig(**TINY), seed=1)          # float32: 1e39 overflows to inf
        return finetune.finetune(model, "lora", corpus, _config(tmp_path, lr=lr, min_lr=0.0, warmup_steps=0),
                                 out_dir=tmp_path, latency_repeats=0, eval_batches=1,
                                 settings=ml.MethodSettings(lora=ml.LoRAConfig(r=2, alpha=4.0)))

    run(1e-2)
    names = [train.CHECKPOINT_NAME, "checkpoint.json", ml.lora.ADAPTER_WEIGHTS, ml.lora.ADAPTER_CONFIG]
    before = {name: (tmp_path / name).read_bytes() for name in names}
    with pytest.raises(FloatingPointError, match=r"non-finite value.*after step 1: training stopped and nothing "
                                                 r"was written; the last checkpoint \(none written by this run\)"):
        run(1e39)
    assert {name: (tmp_path / name).read_bytes() for name in names} == before
    assert not _temporaries(tmp_path)


@pytest.mark.filterwarnings("ignore:.*(overflow|invalid value):RuntimeWarning")
def test_a_non_finite_result_is_never_saved(tmp_path, monkeypatch):
    corpus = _toy_corpus()
    real_fit = finetune.fit

    def fit_then_poison(model, *args, **kwargs):      # as if the last update had overflowed unnoticed
        result = real_fit(model, *args, **kwargs)
        lora_b = [p for n, p in model.named_parameters() if n.endswith("lora_B")][0]
        lora_b.data[...] = float("inf")
        return result

    monkeypatch.setattr(finetune, "fit", fit_then_poison)
    with pytest.raises(FloatingPointError, match=r"lora_B holds \d+ non-finite values .* after step 6"):
        finetune.finetune(ml.GPT(ml.GPTConfig(**TINY), seed=1), "lora", corpus, _config(None), out_dir=tmp_path,
                          latency_repeats=0, eval_batches=1)
    assert not list(tmp_path.iterdir())


def _comparable(run):
    return {k: v for k, v in dataclasses.asdict(run).items() if k not in ("step_seconds", "latency_ms")}


@pytest.mark.parametrize("method", ["adapters", "prefix-mlp", "prompt", "lora+prefix"])
def test_every_method_resumes_an_interrupted_fine_tune_exactly(method, tmp_path, monkeypatch):
    corpus = _toy_corpus()

    def run(out, resume_from=None):
        model = ml.GPT(ml.GPTConfig(**TINY), seed=1)
        result = finetune.finetune(model, method, corpus, _config(out, checkpoint_every=2), latency_repeats=0,
                                   eval_batches=1, seed=4, resume_from=resume_from)
        return model, result

    full_model, full = run(tmp_path / "full")
    real_save = train.save_checkpoint
    calls = []

    def save_then_crash(*args, **kwargs):
        path = real_save(*args, **kwargs)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "part")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert train.read_checkpoint(tmp_path / "part" / train.CHECKPOINT_NAME)[1]["step"] == 4
    evaluations = []
    monkeypatch.setattr(finetune, "evaluate", lambda *a, **k: evaluations.append(1) or train.evaluate(*a, **k))
    resumed_model, resumed = run(tmp_path / "part", tmp_path / "part" / train.CHECKPOINT_NAME)
    assert _comparable(resumed) == _comparable(full)
    assert len(evaluations) == 1                      # val_after only: val_before came from the checkpoint
    for (name, a), (_, b) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        assert np.array_equal(host(a.data), host(b.data)), name


def test_a_classification_fine_tune_resumes_exactly(tmp_path):
    from minilora import tasks

    task = tasks.load_task("prose-or-package", length=15, val_per_class=4)
    config = _config(tmp_path, steps=4, checkpoint_every=2)

    def run(resume_from=None):
        model = ml.GPT(ml.GPTConfig(**TINY), seed=1)
        return finetune.finetune(model, "lora", task, config, latency_repeats=0, seed=2, resume_from=resume_from)

    full = run()
    resumed = run(tmp_path / train.CHECKPOINT_NAME)        # a finished run: resumes to the end at once
    assert _comparable(resumed) == _comparable(full) and full.metric == "accuracy"


def test_resuming_a_fine_tune_with_anything_different_is_refused_before_any_work(tmp_path, monkeypatch):
    corpus = _toy_corpus()
    lora = ml.MethodSettings(lora=ml.LoRAConfig(r=2, alpha=4.0))
    checkpoint = tmp_path / train.CHECKPOINT_NAME
    finetune.finetune(ml.GPT(ml.GPTConfig(**TINY), seed=1), "lora", corpus, _config(tmp_path, steps=2),
                      latency_repeats=0, eval_batches=1, settings=lora, seed=5)

    def no_work(*args, **kwargs):
        raise AssertionError("evaluation or training started")

    monkeypatch.setattr(finetune, "fit", no_work)
    monkeypatch.setattr(finetune, "evaluate", no_work)

    def resume(method="lora", model_seed=1, dtype="float32", data=corpus, config=None, **kwargs):
        model = ml.GPT(ml.GPTConfig(**TINY), seed=model_seed, dtype=dtype)
        finetune.finetune(model, method, data, config or _config(tmp_path, steps=2), latency_repeats=0,
                          resume_from=checkpoint, **{"eval_batches": 1, "settings": lora, "seed": 5, **kwargs})

    cases = [
        (dict(method="full"), r"method='lora', this run has method='full'"),
        (dict(settings=ml.MethodSettings(lora=ml.LoRAConfig(r=3, alpha=4.0))), r"settings\.lora\.r=2.*settings\.lora\.r=3"),
        (dict(seed=6), r"seed=5, this run has seed=6"),
        (dict(model_seed=2), r"base_sha256=.*the base model's weights differs"),
        (dict(dtype="float64"), r"base_dtype='float32', this run has base_dtype='float64'"),
        (dict(eval_batches=2), r"eval_batches=1, this run has eval_batches=2"),
        (dict(data=data.Corpus("other", "toy", "", corpus.train, corpus.val)), r"data\.corpus='toy-reverse'"),
        (dict(data=data.Corpus("toy-reverse", "toy", "", corpus.train[:-1], corpus.val)), r"data\.sha256="),
        (dict(config=_config(tmp_path, steps=2, lr=1e-2)), r"lr=0\.003, this run has lr=0\.01"),
        (dict(config=_config(tmp_path, steps=2, weight_decay=0.0)), r"weight_decay=0\.1, this run has weight_decay=0\.0"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            resume(**kwargs)
    pretraining = tmp_path / "pretrain"
    train.fit(ml.GPT(ml.GPTConfig(**TINY), seed=1), corpus.train, None, _config(pretraining, steps=1))
    with pytest.raises(ValueError, match="records no fine-tuning run"):
        finetune.finetune(ml.GPT(ml.GPTConfig(**TINY), seed=1), "full", corpus, _config(None, steps=1),
                          latency_repeats=0, resume_from=pretraining / train.CHECKPOINT_NAME)


def test_fit_refuses_a_checkpoint_of_other_trainable_parameters_or_dtype(tmp_path):
    ids = tokenizer.encode(data.toy_text("reverse", 300, seed=0))
    bitfit = ml.apply_method(ml.GPT(ml.GPTConfig(**TINY), seed=0), "bitfit")
    train.fit(bitfit, ids, None, _config(tmp_path, steps=2))
    with pytest.raises(ValueError, match=r"other parameters than this model trains \(only in the checkpoint: none; "
                                         r"only here: h\.0\.attn\.k_proj\.weight"):
        train.fit(ml.GPT(ml.GPTConfig(**TINY), seed=0), ids, None, _config(tmp_path, steps=2),
                  resume_from=tmp_path / train.CHECKPOINT_NAME)
    with pytest.raises(ValueError, match="it holds a float32 model, this model is float64"):
        train.fit(ml.apply_method(ml.GPT(ml.GPTConfig(**TINY), seed=0, dtype="float64"), "bitfit"), ids, None,
                  _config(tmp_path, steps=2), resume_from=tmp_path / train.CHECKPOINT_NAME)


def test_resuming_with_another_thread_count_warns_that_the_bits_will_differ(tmp_path):
    ids = tokenizer.encode(data.toy_text("reverse", 300, seed=0))
    train.fit(ml.GPT(ml.GPTConfig(**TINY), seed=0), ids, None, _config(tmp_path, steps=2, threads=1))
    with pytest.warns(RuntimeWarning, match=r"'threads': 1\}, with .*'threads': 2\}.*not bit for bit"):
        train.fit(ml.GPT(ml.GPTConfig(**TINY), seed=0), ids, None, _config(tmp_path, steps=2, threads=2),
                  resume_from=tmp_path / train.CHECKPOINT_NAME)


def test_stale_temporaries_are_cleared_when_a_run_starts_writing(tmp_path):
    corpus = _toy_corpus()
    checkpoints, results = tmp_path / "checkpoints", tmp_path / "results"
    for folder in (checkpoints, results):
        folder.mkdir()
        (folder / f".checkpoint.safetensors.x1{TEMPORARY_SUFFIX}").write_bytes(b"killed mid-write")
        (folder / "notes.txt").write_text("kept")
    finetune.finetune(ml.GPT(ml.GPTConfig(**TINY), seed=1), "full", corpus, _config(checkpoints, steps=1),
                      out_dir=results, latency_repeats=0, eval_batches=1)
    for folder in (checkpoints, results):
        assert not _temporaries(folder) and (folder / "notes.txt").read_text() == "kept"
    assert (checkpoints / train.CHECKPOINT_NAME).is_file() and (results / "model.safetensors").is_file()


def test_the_finite_check_names_the_tensor_and_is_cheap():
    model = ml.load_pretrained(dropout=0.0)
    t0 = time.perf_counter()
    for _ in range(5):
        train.check_finite(model, 7)
    seconds = (time.perf_counter() - t0) / 5
    assert seconds < 0.05 or ml.current_backend() != "numpy", seconds     # ~0.2 ms for the 0.8 M weights
    p = dict(model.named_parameters())["ln_f.bias"]
    p.data[:2] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"parameter ln_f\.bias holds 2 non-finite values \(nan/inf\) "
                                                 r"after step 7.*\(none written by this run\) is untouched"):
        train.check_finite(model, 7)
    assert math.isinf(float(host(p.data)[0]))
