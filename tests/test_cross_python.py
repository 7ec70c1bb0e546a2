"""Inputs and figures that must not depend on the Python build: the shipped texts, their tokens, and fixed-seed
training runs, against values recorded here. CI runs this file on a second Python (the Debian system Python,
which has other pydoc topics and email sources and no tkinter); the same numbers must come back there.

The runs are float64, so the only freedom left is BLAS summation order, far below the 1e-6 they are held to."""
import hashlib
import json
import subprocess
import sys

import numpy
import pytest

import minilora as ml
from minilora import data, stdlib_texts, tasks, train
from minilora.core.methods import apply_method
from minilora.finetune import finetune
from minilora.io.pretrained import load_pretrained

TEXT_SHA256 = {
    "pydoc": "37d06970fc926e60c16dff401e441b84752446a36b6b64516c229fdec77e992c",
    "email": "815bad69104ad5e4860f1086c91859d648388f6f9fb3632992d249a5dde34f97",
    "tkinter": "a68bbc00c21175c43f20f1255e08042af6b8601f718e05d302f3a10229521a77",
    "asyncio": "f5fd9f9a99e62e298eacf8fed62c832bf6b4cc3da3c336e33ad66e1f076d7d27",
    "xml": "9a7c781317ef549bf32e0c7db1950bd095d9fcb54d827835ebff0cf44cc31396",
}
# sha256 (first 16 hex digits) of the token bytes of each corpus split and task array
CORPUS_TOKENS = {
    "pydoc": ("bc6a86aa72c6b327", "fbfff6de8f07cb4c"),
    "python-email": ("290f3050a60c8cb0", "0ea2c31d2ff59fc6"),
}
TASK_TOKENS = {
    "prose-or-package": (("bc6a86aa72c6b327", "290f3050a60c8cb0", "dfe09e04489bec9d", "a1a3a6521291d0b1"),
                         "eae0a7e139cd8b5a", "f7f1dad03b7bcfec"),
    "stdlib-package": (("a1a3a6521291d0b1", "290f3050a60c8cb0", "dfe09e04489bec9d", "0397fe74f66427bb"),
                       "e122a3c72706afa7", "f7f1dad03b7bcfec"),
}
PRETRAIN_LOSSES = [4.54806836371383, 4.460204501777648, 4.324420704327331, 4.213656815756039, 4.199942977127665,
                   4.157082628303694, 4.026117358763027, 4.004880950325297]
PRETRAIN_VAL = 4.0046990382135785
LORA_VAL_BEFORE, LORA_VAL_AFTER = 2.364719000098618, 2.286211904273429
LORA_LOSSES = [2.081567605189482, 2.086616218493703, 1.8559892832911447, 2.035754251745372, 1.8335262478503767,
               1.9864856676918705]
CLASSIFIER_LOSSES = [10.10304763540645, 9.887817427266274, 7.312389559635427, 4.96777203064241, 2.5513498717075347]
TOLERANCE = 1e-6


def token_digest(ids) -> str:
    return hashlib.sha256(numpy.ascontiguousarray(ids).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(TEXT_SHA256))
def test_every_text_is_the_recorded_one(name):
    assert stdlib_texts.sha256_text(data.read_text(name)) == TEXT_SHA256[name]


@pytest.mark.parametrize("name", sorted(CORPUS_TOKENS))
def test_corpus_tokens_are_the_recorded_ones(name):
    corpus = data.load_corpus(name)
    assert (token_digest(corpus.train), token_digest(corpus.val)) == CORPUS_TOKENS[name]


@pytest.mark.parametrize("name", sorted(TASK_TOKENS))
def test_task_tokens_are_the_recorded_ones(name):
    task = tasks.load_task(name)
    train_digests, val_x, val_y = TASK_TOKENS[name]
    assert tuple(token_digest(ids) for ids in task.train) == train_digests
    assert (token_digest(task.val_x), token_digest(task.val_y)) == (val_x, val_y)


def test_a_fixed_seed_pretraining_gives_the_recorded_losses():
    corpus = data.load_corpus("pydoc")
    model = ml.GPT(ml.GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0), seed=0,
                   dtype="float64")
    config = train.TrainConfig(steps=8, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=0, seed=0, quiet=True)
    result = train.fit(model, corpus.train, corpus.val, config)
    assert [loss for _, loss in result.train] == pytest.approx(PRETRAIN_LOSSES, rel=0, abs=TOLERANCE)
    val = train.evaluate(model, corpus.val, batch_size=8, max_batches=2)
    assert val == pytest.approx(PRETRAIN_VAL, rel=0, abs=TOLERANCE)


def test_a_fixed_seed_lora_finetune_gives_the_recorded_losses():
    model = load_pretrained(dtype="float64", dropout=0.0)
    config = train.TrainConfig.for_finetuning(6, 4, 1e-2, warmup_steps=2, eval_every=0, seed=0, quiet=True)
    run = finetune(model, "lora", data.load_corpus("python-email"), config, latency_repeats=0, eval_batches=2)
    assert [loss for _, loss in run.train_curve] == pytest.approx(LORA_LOSSES, rel=0, abs=TOLERANCE)
    assert (run.val_before, run.val_after) == pytest.approx((LORA_VAL_BEFORE, LORA_VAL_AFTER), rel=0, abs=TOLERANCE)


def test_a_fixed_seed_classifier_gives_the_recorded_losses():
    model = apply_method(load_pretrained(dtype="float64", dropout=0.0), "lora")
    task = tasks.load_task(length=31, val_per_class=4)
    run = tasks.train_classifier(model, task, steps=5, batch_size=4, lr=1e-2, warmup_steps=1)
    assert run.losses == pytest.approx(CLASSIFIER_LOSSES, rel=0, abs=TOLERANCE)


def test_minilora_compare_fast_runs(tmp_path):
    run = subprocess.run([sys.executable, "-m", "minilora", "compare", "--fast", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "result.json").read_text())["rows"]
    assert [row["method"] for row in rows] == list(ml.METHODS)
    assert all(numpy.isfinite(row["lm"]["mean"]) and 0 <= row["accuracy"]["mean"] <= 1 for row in rows)
