"""Tokenizer, corpora, batching and toy tasks."""
import numpy as np
import pytest

from minilora import backend, data, tokenizer


def test_vocabulary_is_fixed():
    assert tokenizer.VOCAB_SIZE == 96
    assert tokenizer.CHARS[0] == "\n"
    assert tokenizer.CHARS[1:] == "".join(chr(c) for c in range(32, 127) if chr(c) != "`")
    assert len(set(tokenizer.CHARS)) == len(tokenizer.CHARS) == 95


def test_round_trip_of_text_in_the_vocabulary():
    text = 'def f(x):\n    return {"a": [x ** 2, ~x]}  # 100% ok?\n'
    ids = tokenizer.encode(text)
    assert ids.dtype == np.uint8 and ids.shape == (len(text),)
    assert ids.min() >= 1 and ids.max() < 96
    assert tokenizer.decode(ids) == text


def test_unknown_characters_become_unk():
    ids = tokenizer.encode("a\tb’c`")
    assert ids.tolist()[1] == tokenizer.UNK_ID and ids.tolist()[3] == tokenizer.UNK_ID
    assert ids.tolist()[5] == tokenizer.UNK_ID
    assert tokenizer.decode(ids) == "a\ufffdb\ufffdc\ufffd"
    assert tokenizer.unknown_fraction("ab\t") == pytest.approx(1 / 3)


@pytest.mark.parametrize("bad", [[96], [-1], [0, 1, 200]])
def test_decode_rejects_ids_out_of_range(bad):
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode(bad)


def test_decode_and_encode_reject_wrong_types():
    with pytest.raises(TypeError, match="integer ids"):
        tokenizer.decode(np.array([1.5]))
    with pytest.raises(TypeError, match="expects a str"):
        tokenizer.encode(b"bytes")


@pytest.mark.parametrize("name", sorted(data.CORPORA))
def test_corpora_split_deterministically(name):
    a, b = data.load_corpus(name), data.load_corpus(name)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    total = len(a.train) + len(a.val)
    assert total == len(a.text) > 100_000
    assert len(a.val) == total - int(total * 0.9)
    assert tokenizer.decode(np.concatenate([a.train, a.val])).replace("\ufffd", "") == \
        "".join(ch for ch in a.text if ch in tokenizer.CHARS)
    assert tokenizer.unknown_fraction(a.text) < 0.01


def test_downstream_domain_differs_from_pretraining():
    prose, code = data.load_corpus("pydoc"), data.load_corpus("python-email")
    per_char = lambda corpus, s: corpus.text.count(s) / len(corpus.text)
    assert code.text.count("self.") > 500 and code.text.count("def ") > 300
    for token in ("self.", "def "):   # code is dense with what prose about code mentions only now and then
        assert per_char(code, token) > 10 * per_char(prose, token)


def test_unknown_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown corpus 'nope'"):
        data.load_corpus("nope")


def test_batches_are_windows_with_targets_shifted_by_one():
    ids = np.arange(1000)          # every value unique, so a window's first id is its position
    idx, targets = map(backend.to_numpy, data.get_batch(ids, 5, 16, np.random.default_rng(0)))
    assert idx.shape == targets.shape == (5, 16) and idx.dtype == np.int64
    for row, tgt in zip(idx, targets):
        start = int(row[0])
        assert np.array_equal(row, ids[start:start + 16])
        assert np.array_equal(tgt, ids[start + 1:start + 17])


def test_batches_are_deterministic_under_a_seed():
    ids = np.random.default_rng(1).integers(0, 96, 5000)
    a = data.get_batch(ids, 4, 32, np.random.default_rng(7))
    b = data.get_batch(ids, 4, 32, np.random.default_rng(7))
    c = data.get_batch(ids, 4, 32, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_batch_from_too_short_a_text_is_a_clear_error():
    with pytest.raises(ValueError, match="needs at least 17"):
        data.get_batch(np.arange(10), 2, 16, np.random.default_rng(0))


def test_sequential_batches_cover_every_window_once():
    ids = np.arange(1000)
    batches = [tuple(map(backend.to_numpy, b)) for b in data.sequential_batches(ids, 4, 10)]
    idx = np.concatenate([b[0] for b in batches])
    assert idx.shape == (99, 10)
    assert np.array_equal(idx.reshape(-1), ids[:990])
    assert np.array_equal(np.concatenate([b[1] for b in batches]).reshape(-1), ids[1:991])
    assert len(list(data.sequential_batches(ids, 4, 10, max_batches=2))) == 2


@pytest.mark.parametrize("task", data.TOY_TASKS)
def test_toy_tasks(task):
    text = data.toy_text(task, 50, seed=3)
    assert text == data.toy_text(task, 50, seed=3) != data.toy_text(task, 50, seed=4)
    lines = text.splitlines()
    assert len(lines) == 50
    for line in lines:
        left, right = line.split("=")
        expected = {"copy": left, "reverse": left[::-1]}.get(task) or str(sum(map(int, left.split("+"))))
        assert right == expected
    assert tokenizer.unknown_fraction(text) == 0.0
