"""Nothing silently wrong with files and model state: every bit flip and truncation of minilora's own files is
detected, non-finite tensors are refused on save and load, loads are transactional, merge states are explicit,
and an adapter knows the base it was trained on."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as raw_save

import minilora as ml
from minilora.io import interop
from minilora.io.adapter_files import load_lora, save_lora
from minilora.io.checkpoints import load_checkpoint, save_checkpoint
from minilora.io.files import load_safetensors, remove_stale_temporaries, save_safetensors, write_bytes_atomic

CONFIG = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
FLIPS = 60          # random single-bit flips per file kind


def tiny(seed=0, dtype="float64"):
    return ml.GPT(ml.GPTConfig(**CONFIG), seed=seed, dtype=dtype)


def with_lora(seed=0):
    model = tiny(seed)
    ml.apply_lora(model, ml.LoRAConfig(r=2, alpha=4.0))
    for _, p in model.named_parameters(trainable_only=True):        # a non-zero adapter
        p.data[...] = np.random.default_rng(seed + 7).standard_normal(p.shape) * 0.1
    return model


def snapshot(model):
    return {name: p.data.copy() for name, p in model.named_parameters()}


def unchanged(model, before):
    now = dict(model.named_parameters())
    return set(now) == set(before) and all(np.array_equal(now[k].data, v) for k, v in before.items())


def logits(model):
    return model.forward(np.arange(8).reshape(1, 8) % 11)


# ----------------------------------------------------------------------------------------------------
# bit flips and truncation of every file kind


def write_checkpoint(folder):
    model = tiny()
    optimizer = ml.AdamW(model.parameters(), lr=1e-3)
    loss, dlogits = ml.cross_entropy(model.forward(np.zeros((1, 8), dtype=np.int64)), np.ones((1, 8), dtype=np.int64))
    model.backward(dlogits)
    optimizer.step()
    save_checkpoint(folder / "checkpoint.safetensors", model, optimizer, {"step": 1})
    return [folder / "checkpoint.safetensors"], lambda: load_checkpoint(folder / "checkpoint.safetensors")


def write_adapter(folder):
    save_lora(with_lora(), folder)
    return [folder / "adapter.safetensors", folder / "adapter_config.json"], lambda: load_lora(tiny(), folder)


def write_hf_export(folder):
    interop.save_hf_gpt2(tiny(), folder)
    return [folder / "model.safetensors"], lambda: interop.load_hf_gpt2(folder, dtype="float64")


def write_peft_export(folder):
    interop.save_peft_adapter(with_lora(), folder)
    return ([folder / "adapter_model.safetensors", folder / "adapter_config.json"],
            lambda: interop.load_peft_adapter(tiny(), folder))


def write_exported_model(folder):
    from minilora.io.pretrained import NAME, export_pretrained, load_pretrained

    export_pretrained(tiny(), {"corpus": "pydoc", "val_loss": 2.5}, folder)
    return ([folder / f"{NAME}.safetensors", folder / f"{NAME}.json"],
            lambda: load_pretrained(dtype="float64", directory=folder))


KINDS = {"checkpoint": write_checkpoint, "exported model": write_exported_model, "adapter": write_adapter, "HF GPT-2 export": write_hf_export,
         "PEFT export": write_peft_export}


def flip(path: Path, bit: int) -> bytes:
    original = path.read_bytes()
    damaged = bytearray(original)
    damaged[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(damaged))
    return original


def same_json(original: bytes, damaged: bytes) -> bool:
    try:
        return json.loads(original) == json.loads(damaged)
    except ValueError:
        return False


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_bit_flip_and_truncation_of_minilora_files_is_detected(tmp_path, kind):
    """Each flip is a single bit anywhere in a file (header, metadata, tensor data, the JSON copy); each must
    make the load fail with a ValueError, never load different numbers."""
    files, load = KINDS[kind](tmp_path)
    load()                                                          # the intact files load
    rng = np.random.default_rng(sum(map(ord, kind)))
    detected = tried = 0
    for path in files:
        size_bits = path.stat().st_size * 8
        for bit in rng.integers(0, size_bits, size=FLIPS // len(files)):
            original = flip(path, int(bit))
            tried += 1
            try:
                load()
            except (ValueError, UnicodeDecodeError):
                detected += 1
            finally:
                path.write_bytes(original)
        for keep in (0, 7, 8, path.stat().st_size // 2, path.stat().st_size - 1):
            original = path.read_bytes()
            if same_json(original, original[:keep]):      # only the trailing newline gone: nothing changed
                continue
            path.write_bytes(original[:keep])
            tried += 1
            try:
                load()
            except (ValueError, FileNotFoundError):
                detected += 1
            finally:
                path.write_bytes(original)
    assert detected == tried, f"{kind}: {detected} of {tried} damaged files detected"


# ----------------------------------------------------------------------------------------------------
# finite or nothing


def test_a_non_finite_tensor_is_refused_on_save_and_the_old_file_survives(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / "c.safetensors", model)
    before = (tmp_path / "c.safetensors").read_bytes()
    p = dict(model.named_parameters())["h.1.mlp.fc.weight"]
    p.data[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"tensor 'model.h.1.mlp.fc.weight' .* holds 1 non-finite value"):
        save_checkpoint(tmp_path / "c.safetensors", model)
    assert (tmp_path / "c.safetensors").read_bytes() == before
    p.data[0, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        save_safetensors({"x": p.data}, tmp_path / "new.safetensors")
    assert not (tmp_path / "new.safetensors").exists()
    assert not list(tmp_path.glob(".*minilora-tmp"))


def test_a_non_finite_tensor_is_refused_on_load(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(raw_save({"w": np.array([1.0, np.nan]), "ok": np.ones(2)}))
    with pytest.raises(ValueError, match=r"tensor 'w' of .*bad.safetensors holds 1 non-finite"):
        load_safetensors(tmp_path / "bad.safetensors")
    model = tiny()
    before = snapshot(model)
    state = {k: v.copy() for k, v in before.items()}
    state["ln_f.bias"][0] = np.inf
    with pytest.raises(ValueError, match=r"state\['ln_f.bias'\] holds NaN or inf"):
        model.load_state_dict(state)
    assert unchanged(model, before)


def test_a_file_without_an_integrity_record_is_not_taken_for_minilora_s_own(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / "c.safetensors", model)
    tensors, header = load_safetensors(tmp_path / "c.safetensors")
    header = {k: v for k, v in header.items() if k != "minilora_sha256"}
    (tmp_path / "c.safetensors").write_bytes(raw_save(tensors, metadata=header))
    with pytest.raises(ValueError, match="no integrity record"):
        load_checkpoint(tmp_path / "c.safetensors")


def test_stale_temporaries_are_recognisable_and_removed(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"x")
    (tmp_path / ".a.bin.abc123.minilora-tmp").write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".a.bin.abc123.minilora-tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "keep.tmp"]


# ----------------------------------------------------------------------------------------------------
# merge states and transactional loads


def test_every_merge_state_transition(tmp_path):
    model = with_lora()
    unmerged_logits = logits(model)
    with pytest.raises(ValueError, match="not merged"):
        ml.unmerge_lora(model)
    ml.merge_lora(model)
    assert np.allclose(logits(model), unmerged_logits, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="already merged"):
        ml.merge_lora(model)
    merged_state = snapshot(model)
    with pytest.raises(ValueError, match="merged LoRA layer"):                  # across merge states
        model.load_state_dict({k: v.copy() for k, v in merged_state.items()})
    save_lora(with_lora(seed=0), tmp_path / "adapter")
    with pytest.raises(ValueError, match="merged"):
        load_lora(model, tmp_path / "adapter")
    assert unchanged(model, merged_state)
    save_lora(model, tmp_path / "from-merged")                   # the adapter itself, whatever the merge state
    fresh = load_lora(tiny(), tmp_path / "from-merged")
    assert np.allclose(logits(fresh), unmerged_logits, rtol=1e-12, atol=1e-12)
    ml.unmerge_lora(model)
    assert np.array_equal(logits(model), unmerged_logits)
    model.load_state_dict({k: v.copy() for k, v in snapshot(model).items()})  # unmerged: loads fine


def test_a_failed_load_leaves_the_model_exactly_as_it_was(tmp_path):
    save_lora(with_lora(seed=0), tmp_path / "adapter")
    other = ml.GPT(ml.GPTConfig(**{**CONFIG, "n_embd": 12}), seed=0, dtype="float64")
    before = snapshot(other)
    with pytest.raises(ValueError, match="trained on a model with config"):
        load_lora(other, tmp_path / "adapter")
    assert unchanged(other, before) and not ml.lora.lora_modules(other)
    model = tiny()
    before = snapshot(model)
    shutil.copytree(tmp_path / "adapter", tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "adapter_config.json").read_text())
    config["lora_config"]["alpha"] = 99.0
    (tmp_path / "edited" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"adapter_config.json does not match .*differing: \['lora_config'\]"):
        load_lora(model, tmp_path / "edited")
    assert unchanged(model, before) and not ml.lora.lora_modules(model)
    (tmp_path / "edited" / "adapter_config.json").unlink()          # the weights file alone is self-consistent
    load_lora(model, tmp_path / "edited")
    assert ml.lora.lora_modules(model)
    peft = tmp_path / "peft"
    interop.save_peft_adapter(with_lora(), peft)
    (peft / "adapter_config.json").write_text("{}")
    target = tiny()
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"lacks \['peft_type', 'r', 'lora_alpha', 'target_modules'\]"):
        interop.load_peft_adapter(target, peft)
    assert unchanged(target, before)


def test_an_adapter_knows_its_base(tmp_path):
    save_lora(with_lora(seed=0), tmp_path / "adapter")
    other_base = tiny(seed=1)                                      # same config, other weights
    before = snapshot(other_base)
    with pytest.raises(ValueError, match="trained on other base weights"):
        load_lora(other_base, tmp_path / "adapter")
    assert unchanged(other_base, before)
    load_lora(other_base, tmp_path / "adapter", force=True)
    same_base_float32 = tiny(seed=0, dtype="float32")
    load_lora(same_base_float32, tmp_path / "adapter")             # the same base in another dtype is the same base


def test_peft_export_refuses_unknown_tensors(tmp_path):
    interop.save_peft_adapter(with_lora(), tmp_path)
    tensors, header = load_safetensors(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.transformer.wte.weight"] = np.ones((11, 8))
    (tmp_path / "adapter_model.safetensors").write_bytes(raw_save(tensors, metadata={"format": "pt"}))
    with pytest.raises(ValueError, match="holds the tensor .*wte.weight.*, which the config does not account for"):
        interop.load_peft_adapter(tiny(), tmp_path)


def test_the_same_content_gives_the_same_bytes_in_every_process(tmp_path):
    """Files are written by minilora's own safetensors encoder (tensors and metadata in a fixed order), so an
    adapter or checkpoint has one sha256 whichever process wrote it; safetensors reads it as it reads its own."""
    import subprocess
    import sys

    script = ("import sys, numpy as np; from minilora.io.files import save_safetensors\n"
              "t = {'w': np.arange(12.).reshape(3, 4), 'b': np.arange(3, dtype=np.float32), 'n': np.array(2.5),\n"
              "     'i': np.arange(5)}\n"
              "save_safetensors(t, sys.argv[1], {'format': 'pt', 'minilora': '{\"step\": 3}', 'other': 'x'})\n")
    for name in ("one", "two"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{name}.safetensors")], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": name == "one" and "1" or "2"})
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    from safetensors.numpy import load
    loaded = load((tmp_path / "one.safetensors").read_bytes())
    assert loaded["n"].shape == () and loaded["b"].dtype == np.float32 and loaded["i"].tolist() == [0, 1, 2, 3, 4]
    assert np.array_equal(loaded["w"], np.arange(12.).reshape(3, 4))


def test_a_foreign_gpt2_file_is_taken_whole_or_refused(tmp_path):
    interop.save_hf_gpt2(tiny(), tmp_path)
    tensors, header = load_safetensors(tmp_path / "model.safetensors")
    extra = dict(tensors, **{"transformer.h.2.ln_1.weight": np.ones(8)})            # a layer beyond n_layer
    (tmp_path / "model.safetensors").write_bytes(raw_save(extra, metadata={"format": "pt"}))
    with pytest.raises(ValueError, match=r"tensors a GPT-2 of 2 layers does not have: \['transformer.h.2.ln_1.weight'\]"):
        interop.load_hf_gpt2(tmp_path, dtype="float64")
    buffers = dict(tensors, **{"transformer.h.0.attn.bias": np.tril(np.ones((8, 8)))})   # old checkpoints' mask
    (tmp_path / "model.safetensors").write_bytes(raw_save(buffers, metadata={"format": "pt"}))
    interop.load_hf_gpt2(tmp_path, dtype="float64")
    config = json.loads((tmp_path / "config.json").read_text())
    del config["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks \['n_embd'\]"):
        interop.load_hf_gpt2(tmp_path, dtype="float64")
