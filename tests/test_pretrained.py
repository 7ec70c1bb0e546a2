"""The pretrained tiny GPT shipped inside the package."""
import math

import pytest

import minilora as ml
from minilora import data, pretrained, train


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


def test_validation_loss_matches_the_recorded_value(info, model):
    val = train.evaluate(model, data.load_corpus("pydoc").val)
    # same code and data: the recorded value comes back up to float32 summation-order noise
    assert val == pytest.approx(info["val_loss"], abs=0.02)
    assert info["val_bits_per_char"] == pytest.approx(info["val_loss"] / math.log(2))


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
