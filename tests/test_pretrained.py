"""The pretrained tiny GPT shipped inside the package."""
import math
import re

import pytest

import minilora as ml
from minilora import cli, data, pretrained, train


@pytest.fixture(scope="module")
def info():
    return pretrained.pretrained_info()


@pytest.fixture(scope="module")
def model():
    return pretrained.load_pretrained()


def test_metadata_describes_the_default_tiny_gpt(info):
    assert info["model_config"] == {**ml.GPTConfig().to_dict(), "dropout": info["model_config"]["dropout"]}
    assert info["corpus"] == "pydoc" and info["downstream_corpus"] == "python-email"
    assert info["steps"] > 0 and info["seed"] == 0 and info["command"].startswith("minilora pretrain")
    assert info["wall_seconds"] <= 15 * 60
    assert info["size_bytes"] < 5 * 1024 * 1024


def test_sha256_matches_the_metadata(info):
    path = pretrained.PRETRAINED_DIR / f"{pretrained.NAME}.safetensors"
    assert pretrained.sha256_file(path) == info["sha256"]


def test_the_shipped_model_was_measured_on_the_shipped_snapshots(info):
    assert info["corpus_sha256"] == data.load_corpus(info["corpus"]).sha256
    assert info["downstream_corpus_sha256"] == data.load_corpus(info["downstream_corpus"]).sha256


@pytest.mark.parametrize("prefix", ["", "downstream_"])
def test_validation_loss_matches_the_recorded_value(info, model, prefix):
    val = train.evaluate(model, data.load_corpus(info[f"{prefix}corpus"]).val)
    # the same weights, text and code: only float32 summation order (BLAS kernel, batch split) can move it
    assert val == pytest.approx(info[f"{prefix}val_loss"], abs=1e-6)
    assert info[f"{prefix}val_bits_per_char"] == pytest.approx(info[f"{prefix}val_loss"] / math.log(2))


@pytest.mark.parametrize("corpus_key", ["corpus", "downstream_corpus"])
def test_minilora_eval_reproduces_the_recorded_loss(info, corpus_key, capsys):
    assert cli.main(["eval", "--corpus", info[corpus_key]]) == 0
    out = capsys.readouterr().out
    loss = float(re.search(r"loss (\S+) nats/char", out).group(1))
    difference = float(re.search(r"\(difference (\S+)\)", out).group(1))
    recorded = info["val_loss" if corpus_key == "corpus" else "downstream_val_loss"]
    assert abs(difference) <= 1e-6 and loss == pytest.approx(recorded, abs=1e-6)


def test_the_downstream_domain_is_clearly_worse(info, model):
    assert info["downstream_val_loss"] > info["val_loss"] + 0.3
    downstream = train.evaluate(model, data.load_corpus("python-email").val, max_batches=4)
    assert downstream > info["val_loss"] + 0.3


def test_a_damaged_shipped_file_is_refused(tmp_path, info):
    for suffix in (".safetensors", ".json"):
        (tmp_path / f"{pretrained.NAME}{suffix}").write_bytes(
            (pretrained.PRETRAINED_DIR / f"{pretrained.NAME}{suffix}").read_bytes())
    weights = tmp_path / f"{pretrained.NAME}.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        pretrained.load_pretrained(directory=tmp_path)


def test_dropout_override(model):
    quiet = pretrained.load_pretrained(dropout=0.0)
    assert quiet.config.dropout == 0.0
    assert all(getattr(m, "p", 0.0) == 0.0 for _, m in quiet.named_modules())
