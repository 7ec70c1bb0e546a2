"""Bad input is refused at the public boundary with a ValueError/TypeError that names the problem,
before any state changes."""
import re
import sys

import numpy as np
import pytest

import minilora as ml
from minilora import backend, cli, files

CFG = dict(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8)


@pytest.fixture(autouse=True)
def numpy_backend():
    ml.use_backend("numpy")
    yield
    ml.use_backend("numpy")


@pytest.fixture
def model():
    return ml.GPT(ml.GPTConfig(**CFG), seed=0)


def snapshot(model):
    return {name: p.data.copy() for name, p in model.named_parameters()}


def assert_unchanged(model, before):
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, before[name], err_msg=f"{name} changed")


# ----------------------------------------------------------------------------------------------------
# forward inputs

BAD_IDX = {
    "negative id": (np.array([[0, 3, -1]]), ValueError, r"token id -1 is out of range.*\[0, 15\]"),
    "id == vocab_size": (np.array([[0, 16, 2]]), ValueError, r"token id 16 is out of range"),
    "id > vocab_size": (np.array([[99, 1]]), ValueError, r"token id 99 is out of range"),
    "float ids": (np.array([[0.0, 1.0]]), TypeError, r"integer.*float64"),
    "bool ids": (np.array([[True, False]]), TypeError, r"integer.*bool"),
    "too long": (np.zeros((1, 9), dtype=np.int64), ValueError, r"sequence length 9 exceeds block_size 8"),
    "1-D": (np.array([1, 2, 3]), ValueError, r"\(B, T\).*got 1 dimensions"),
    "3-D": (np.zeros((1, 2, 3), dtype=np.int64), ValueError, r"\(B, T\).*got 3 dimensions"),
    "empty": (np.zeros((1, 0), dtype=np.int64), ValueError, r"at least one"),
    "not an array": ("hello", TypeError, r"idx must be an integer array"),
}


@pytest.mark.parametrize("case", list(BAD_IDX))
def test_forward_rejects_bad_token_ids(model, case):
    idx, error, message = BAD_IDX[case]
    with pytest.raises(error, match=message):
        model.forward(idx)


def test_forward_accepts_the_edges_of_the_range(model):
    logits = model.forward(np.array([[0, 15] * 4]))
    assert logits.shape == (1, 8, 16)


# ----------------------------------------------------------------------------------------------------
# config

BAD_CONFIGS = {
    "n_embd not divisible by n_head": (dict(n_embd=10, n_head=3), ValueError, r"n_embd \(10\).*divisible.*n_head \(3\)"),
    "float n_layer": (dict(n_layer=2.0), TypeError, r"n_layer must be an int.*float"),
    "str vocab_size": (dict(vocab_size="96"), TypeError, r"vocab_size must be an int.*str"),
    "bool n_head": (dict(n_head=True), TypeError, r"n_head must be an int.*bool"),
    "zero block_size": (dict(block_size=0), ValueError, r"block_size must be >= 1"),
    "dropout 1": (dict(dropout=1.0), ValueError, r"dropout"),
    "negative eps": (dict(layer_norm_epsilon=-1e-5), ValueError, r"layer_norm_epsilon"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_rejects_bad_fields(case):
    fields, error, message = BAD_CONFIGS[case]
    with pytest.raises(error, match=message):
        ml.GPTConfig(**{**CFG, **fields})


def test_gpt_needs_a_config():
    with pytest.raises(TypeError, match="GPTConfig"):
        ml.GPT(dict(CFG))


# ----------------------------------------------------------------------------------------------------
# backends


@pytest.mark.parametrize("name, error, message", [
    ("tensorflow", ValueError, r"unknown backend 'tensorflow'.*numpy"),
    ("", ValueError, r"unknown backend"),
    (3, TypeError, r"backend name must be a string"),
])
def test_unknown_backend(name, error, message):
    with pytest.raises(error, match=message):
        ml.use_backend(name)
    assert ml.current_backend() == "numpy"


def test_cupy_unavailable_is_a_clear_error_and_keeps_numpy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)     # `import cupy` now fails, installed or not
    with pytest.raises(ValueError, match="CuPy"):
        ml.use_backend("cupy")
    assert ml.current_backend() == "numpy"
    assert backend.xp() is np
    with pytest.raises(ValueError, match="CuPy"):
        with backend.backend("cupy"):
            pass
    assert ml.current_backend() == "numpy"


def test_cli_reports_an_unavailable_backend(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert cli.main(["--backend", "cupy", "gradcheck"]) == 2
    assert "CuPy" in capsys.readouterr().err
    assert ml.current_backend() == "numpy"


# ----------------------------------------------------------------------------------------------------
# state dicts: every failure leaves the weights as they were


def changed_state(model):
    """A complete, valid state with every value different from the model's (so a partial load would show)."""
    return {name: value + 1.0 for name, value in model.state_dict().items()}


def last_name(state):
    return list(state)[-1]   # the last parameter: a loader that copied as it checked would have written the others


def drop_last(state, last):
    del state[last]
    return ValueError, rf"missing keys \['{re.escape(last)}'\]"


def add_extra(state, last):
    state["h.0.extra.weight"] = np.zeros(3)
    return ValueError, r"unexpected keys \['h\.0\.extra\.weight'\]"


def reshape_last(state, last):
    state[last] = np.zeros((3, 3), np.float32)
    return ValueError, rf"state\['{re.escape(last)}'\] has shape \(3, 3\); the model expects \(8,\)"


def list_for_last(state, last):
    state[last] = [0.0] * 8
    return TypeError, rf"state\['{re.escape(last)}'\] must be an array"


STATE_DAMAGE = {"missing key": drop_last, "unexpected key": add_extra, "wrong shape": reshape_last,
                "not an array": list_for_last}


@pytest.mark.parametrize("case", list(STATE_DAMAGE))
def test_load_state_dict_rejects_a_bad_state_and_changes_nothing(model, case):
    state = changed_state(model)
    error, message = STATE_DAMAGE[case](state, last_name(state))
    before = snapshot(model)
    with pytest.raises(error, match=message):
        model.load_state_dict(state)
    assert_unchanged(model, before)


def test_load_state_dict_needs_a_dict(model):
    with pytest.raises(TypeError, match="dict"):
        model.load_state_dict([("wte.weight", np.zeros((16, 8)))])


def test_load_state_dict_accepts_a_good_state(model):
    state = changed_state(model)
    model.load_state_dict(state)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(p.data, state[name])


# ----------------------------------------------------------------------------------------------------
# damaged files


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    files.save_safetensors({"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4)}, path)
    return path


DAMAGE = {
    "truncated data": lambda raw: raw[:-5],
    "truncated header": lambda raw: raw[:20],
    "only the length": lambda raw: raw[:8],
    "empty": lambda raw: b"",
    "garbage": lambda raw: b"not a safetensors file at all" * 3,
    "header not json": lambda raw: raw[:8] + b"{" * (len(raw) - 8),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_load_safetensors_names_a_damaged_file(checkpoint, case):
    checkpoint.write_bytes(DAMAGE[case](checkpoint.read_bytes()))
    with pytest.raises(ValueError, match=re.escape(str(checkpoint)) + ".*not a valid safetensors"):
        files.load_safetensors(checkpoint)


def test_load_safetensors_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        files.load_safetensors(tmp_path / "nowhere.safetensors")


def test_read_json_names_a_damaged_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"n_layer": 2,')
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not valid JSON"):
        files.read_json(path)


# ----------------------------------------------------------------------------------------------------
# cross-entropy

BAD_TARGETS = {
    "wrong shape": (np.zeros((2, 4), dtype=np.int64), ValueError, r"targets have shape \(2, 4\).*need \(2, 3\)"),
    "transposed": (np.zeros((3, 2), dtype=np.int64), ValueError, r"need \(2, 3\)"),
    "negative": (np.array([[0, 1, -1], [0, 0, 0]]), ValueError, r"target -1 is out of range.*\[0, 4\]"),
    "== V": (np.array([[0, 1, 2], [5, 0, 0]]), ValueError, r"target 5 is out of range"),
    "float": (np.zeros((2, 3)), TypeError, r"integer.*float64"),
    "scalar": (3, TypeError, r"targets must be an integer array"),
}


@pytest.mark.parametrize("case", list(BAD_TARGETS))
def test_cross_entropy_rejects_bad_targets(case):
    targets, error, message = BAD_TARGETS[case]
    with pytest.raises(error, match=message):
        ml.cross_entropy(np.zeros((2, 3, 5)), targets)


def test_cross_entropy_ignore_index_is_not_out_of_range():
    loss, _ = ml.cross_entropy(np.zeros((1, 2, 5)), np.array([[-100, 3]]), ignore_index=-100)
    assert loss == pytest.approx(np.log(5))
    with pytest.raises(ValueError, match="ignore_index"):
        ml.cross_entropy(np.zeros((1, 2, 5)), np.array([[-100, -100]]), ignore_index=-100)


def test_cross_entropy_needs_array_logits():
    with pytest.raises(TypeError, match="logits must be an array"):
        ml.cross_entropy([[0.0, 1.0]], np.array([0]))


# ----------------------------------------------------------------------------------------------------
# backward out of order


def test_backward_before_forward(model):
    with pytest.raises(RuntimeError, match="without a forward"):
        model.backward(np.zeros((1, 2, 16), np.float32))


def test_backward_twice(model):
    idx = np.array([[1, 2]])
    _, dlogits = ml.cross_entropy(model.forward(idx), idx)
    model.backward(dlogits)
    with pytest.raises(RuntimeError, match="without a forward"):
        model.backward(dlogits)


def test_backward_with_the_wrong_shape_keeps_the_forward(model):
    idx = np.array([[1, 2, 3]])
    _, dlogits = ml.cross_entropy(model.forward(idx), idx)
    with pytest.raises(ValueError, match=r"dlogits has shape \(1, 2, 16\).*\(1, 3, 16\)"):
        model.backward(dlogits[:, :2])
    model.backward(dlogits)   # the cache survived the refused call
    assert model.wte.weight.grad is not None


def test_module_backward_before_forward():
    lin = ml.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="Linear.backward called without a forward"):
        lin.backward(np.zeros((1, 2), np.float32))


# ----------------------------------------------------------------------------------------------------
# optimizer and dtype arguments


@pytest.mark.parametrize("make, message", [
    (lambda ps: ml.AdamW(ps, lr=-1.0), "learning rate"),
    (lambda ps: ml.AdamW(ps, betas=(1.0, 0.999)), "betas"),
    (lambda ps: ml.AdamW(ps, eps=0.0), "eps"),
    (lambda ps: ml.AdamW(ps, weight_decay=-0.1), "weight_decay"),
    (lambda ps: ml.SGD(ps, lr=0.1, momentum=1.0), "momentum"),
    (lambda ps: ml.clip_grad_norm(ps, 0.0), "max_norm"),
    (lambda ps: ml.cosine_schedule(0, 1.0, warmup_steps=5, total_steps=3), "warmup_steps"),
])
def test_optimizer_arguments(model, make, message):
    with pytest.raises(ValueError, match=message):
        make(model.parameters())


def test_optimizer_needs_parameters():
    with pytest.raises(TypeError, match="expects Parameters.*ndarray"):
        ml.AdamW([np.zeros(3)])


def test_a_peft_adapter_config_is_checked_field_by_field_before_the_model_changes(tmp_path):
    """A PEFT adapter_config.json that is not an object, lacks a required field, has a field of the wrong type or
    one the loader does not know, or asks for something minilora's GPT does not have (repeated layers, an
    initialisation that changes the base) is refused naming the file and the field; the model is left as it was."""
    import json

    model = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
    ml.apply_lora(model, ml.LoRAConfig(r=2, alpha=4))
    ml.interop.save_peft_adapter(model, tmp_path / "good")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    cases = {
        "a list": ([config], "holds a JSON list; a PEFT adapter config is a JSON object"),
        "alpha null": ({**config, "lora_alpha": None}, r"lora_alpha=None; expected a finite number > 0"),
        "r as text": ({**config, "r": "2"}, r"r='2'; expected an int >= 1"),
        "empty": ({}, r"lacks \['peft_type', 'r', 'lora_alpha', 'target_modules'\]"),
        "layer replication": ({**config, "layer_replication": [[0, 1]]}, r"layer_replication=\[\[0, 1\]\] \(repeated"),
        "unknown field": ({**config, "frobnicate": 1}, r"the field 'frobnicate' is not one minilora's loader knows"),
        "bias all": ({**config, "bias": "all"}, r"bias='all'; expected 'none'"),
        "pissa": ({**config, "init_lora_weights": "pissa"}, r"init_lora_weights='pissa' changes the base weights"),
    }
    base = ml.GPT(ml.GPTConfig(**CFG), seed=0, dtype="float64")
    before = {n: p.data.copy() for n, p in base.named_parameters()}
    for name, (bad, message) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(bad))
        (folder / "adapter_model.safetensors").write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=message) as caught:
            ml.interop.load_peft_adapter(base, folder)
        assert "adapter_config.json" in str(caught.value), name
        assert not ml.lora.lora_modules(base), name
        assert all(np.array_equal(p.data, before[n]) for n, p in base.named_parameters()), name
