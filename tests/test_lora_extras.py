"""What PEFT's LoRA trains besides the linear layers' LoRA (lora_extras.py), on a tiny float64 GPT, without torch.

The kinds: LoRA on a table (wte, wpe), lora_bias, trainable tokens, full trained copies (modules_to_save) of
LayerNorms, Linears, the token table and the output head, tied or not. For each kind this proves that
- the adapted model starts exactly at the base, and disable_lora gives the base back exactly;
- the hand-written backward is the derivative of the whole model (a directional check, which a planted bug fails);
- the head reads the table PEFT says it reads (logits recomputed by hand), and exactly the expected numbers train;
- merge_lora is exact (lora_bias included) or refused with nothing changed (LoRA on a table);
- save_lora / load_lora round-trip exactly, and a file that does not fit is refused with nothing changed;
- a bad config is a ValueError naming the problem, the model left as it was;
- the fast path and data parallelism give the reference core's gradients.
"""
import numpy as np
import pytest

import minilora as ml
from helpers import dev, host
from minilora import gradcheck as gc
from minilora import nn, train
from minilora.core import lora_extras
from minilora.parallel import ParallelStep

V, T, L, C = 13, 8, 2, 12       # vocabulary, positions, layers, width
CFG = dict(vocab_size=V, block_size=T, n_layer=L, n_head=3, n_embd=C)
R, ALPHA = 2, 3.0


def lora_linear(n_in, n_out):
    """Numbers LoRA trains on one kind of Linear (n_in -> n_out) in every block."""
    return L * R * (n_in + n_out)


QV = 2 * lora_linear(C, C)      # the default targets q_proj and v_proj

# name: (LoRAConfig fields, trainable numbers)
KINDS = {
    "lora on wte": (dict(targets=("q_proj", "wte")), lora_linear(C, C) + R * (V + C)),
    "lora on wpe": (dict(targets=("v_proj", "wpe")), lora_linear(C, C) + R * (T + C)),
    "lora_bias": (dict(targets=("q_proj", "v_proj", "fc"), lora_bias=True),
                  QV + lora_linear(C, 4 * C) + L * (C + C + 4 * C)),
    "trainable tokens": (dict(trainable_token_indices=(1, 5, 12)), QV + 3 * C),
    "saved ln_f": (dict(modules_to_save=("ln_f",)), QV + 2 * C),
    "saved wte": (dict(modules_to_save=("wte",)), QV + V * C),
    "saved lm_head": (dict(modules_to_save=("lm_head",)), QV + V * C),
    "saved wte and lm_head": (dict(modules_to_save=("wte", "lm_head")), QV + 2 * V * C),
    "saved fc and ln_1": (dict(modules_to_save=("fc", "ln_1")), QV + L * (C * 4 * C + 4 * C + 2 * C)),
    "tied lm_head": (dict(modules_to_save=("lm_head",), ensure_weight_tying=True), QV + V * C),
    "saved wte, tying asked": (dict(modules_to_save=("wte",), ensure_weight_tying=True), QV + V * C),
    "tied wte and lm_head": (dict(modules_to_save=("wte", "lm_head"), ensure_weight_tying=True), QV + V * C),
}


def lora_config(dropout=0.0, **fields):
    return ml.LoRAConfig(**{"r": R, "alpha": ALPHA, "dropout": dropout, **fields})


def base_model(dropout=0.0, seed=1):
    """A float64 GPT with every weight randomised, so that no zero hides a bug."""
    model = ml.GPT(ml.GPTConfig(**CFG, dropout=dropout), seed=0, dtype="float64")
    gc.randomize_parameters(model, seed)
    return model


def copy_of(base):
    model = ml.GPT(base.config, seed=0, dtype="float64")
    model.load_state_dict({k: v.copy() for k, v in base.state_dict().items()})
    return model


def adapted(kind=None, dropout=0.0, **fields):
    """(base, a copy of it adapted with KINDS[kind] (or these LoRAConfig fields))."""
    base = base_model(dropout)
    model = ml.apply_lora(copy_of(base), lora_config(dropout, **(KINDS[kind][0] if kind else fields)))
    return base, model


def randomize_added(model, seed=2, scale=0.3):
    """New values for every parameter the adapter added (B = 0, A = 0 and copies of the base hide nothing then)."""
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        if p.added_by is not None:
            p.data[...] = dev(scale * rng.standard_normal(p.shape))


def tokens(seed=0, shape=(2, T)):
    return np.random.default_rng(seed).integers(0, V, shape)


def logits(model, idx=None):
    return host(model.forward(tokens() if idx is None else idx))


class _ReturnInput(ml.Module):
    def forward(self, x):
        return x


def hidden(model):
    """The final hidden states ln_f(...) (B, T, C): the model run with a head that returns its input."""
    head = model.lm_head
    model.lm_head = _ReturnInput()
    try:
        return logits(model)
    finally:
        model.lm_head = head


def with_table(base, table):
    """A plain GPT (head tied to wte, as pretrained) whose token table is ``table``."""
    model = copy_of(base)
    model.wte.weight.data[...] = dev(table)
    return model


def snapshot(model):
    """What a refused call must leave alone: parameter values and trainable flags, the modules, the head."""
    params = {n: (host(p.data).copy(), p.trainable) for n, p in model.named_parameters()}
    return params, [(n, type(m)) for n, m in model.named_modules()], model.lm_head, vars(model).get("lora_config")


def assert_unchanged(model, before):
    params, modules, head, config = before
    now_params, now_modules, now_head, now_config = snapshot(model)
    assert now_modules == modules and now_head is head and now_config is config
    assert now_params.keys() == params.keys()
    for name, (value, trainable) in params.items():
        assert np.array_equal(now_params[name][0], value) and now_params[name][1] == trainable, name


# ----------------------------------------------------------------------------------------------------
# the start, disabling, what trains


@pytest.mark.parametrize("kind", KINDS)
def test_adapted_model_starts_exactly_at_the_base(kind):
    base, model = adapted(kind)
    base.eval()
    model.eval()
    assert np.array_equal(logits(model), logits(base))


@pytest.mark.parametrize("kind", KINDS)
def test_disable_gives_the_base_and_then_the_adapted_model_back(kind):
    base, model = adapted(kind)
    randomize_added(model)
    changed = logits(model)
    assert not np.array_equal(changed, logits(base))
    with ml.lora.disable_lora(model):
        assert np.array_equal(logits(model), logits(base))
    assert np.array_equal(logits(model), changed)


@pytest.mark.parametrize("kind", KINDS)
def test_exactly_the_added_parameters_train(kind):
    _, model = adapted(kind)
    trainable = {n for n, _ in model.named_parameters(trainable_only=True)}
    assert trainable == {n for n, p in model.named_parameters() if p.added_by is not None}
    assert model.num_parameters(trainable_only=True) == KINDS[kind][1]


# ----------------------------------------------------------------------------------------------------
# gradients


def directional(model, seed=0):
    """The whole model's directional check over its trainable parameters, dropout masks replayed."""
    check = gc.gpt_loss_fn(tokens(), tokens(1), nn.dropout_generators(model))
    return gc.directional_check(model, check, seed=seed)


@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_passes_the_directional_check(kind):
    with ml.use_fast(False):
        _, model = adapted(kind, dropout=0.1)
        randomize_added(model)
        for seed in range(3):
            result = directional(model, seed)
            assert result.passed, (seed, result.rel_error)


REAL_REPLACE_ROWS_BACKWARD = lora_extras.replace_rows_backward
REAL_EMBEDDING_LORA_BACKWARD = lora_extras.embedding_lora_backward


def half_the_token_rows_gradient(dW2, cache):
    return 0.5 * REAL_REPLACE_ROWS_BACKWARD(dW2, cache)


def embedding_lora_without_the_scale_on_B(dout, cache):
    dA, dB = REAL_EMBEDDING_LORA_BACKWARD(dout, cache)
    return dA, dB / cache[-1]          # cache[-1]: the scale


def tied_head_forgetting_the_table(head, dlogits):
    """TiedHead.backward that returns dx but never passes the head's gradient on to the table."""
    linear_cache, _ = head._pop_cache()
    return lora_extras.functional.linear_backward(dlogits, linear_cache)[0]


@pytest.mark.parametrize("kind, owner, name, bug", [
    ("trainable tokens", lora_extras, "replace_rows_backward", half_the_token_rows_gradient),
    ("lora on wte", lora_extras, "embedding_lora_backward", embedding_lora_without_the_scale_on_B),
    ("tied lm_head", lora_extras.TiedHead, "backward", tied_head_forgetting_the_table),
])
def test_directional_check_catches_a_planted_bug(kind, owner, name, bug, monkeypatch):
    with ml.use_fast(False):
        _, model = adapted(kind, dropout=0.1)
        randomize_added(model)
        assert directional(model).passed
        monkeypatch.setattr(owner, name, bug)
        result = directional(model)
        assert not result.passed, result.rel_error


# ----------------------------------------------------------------------------------------------------
# which table the embedding and the head read (adapters of the table alone, targets=())


def test_trainable_tokens_replace_the_rows_that_embedding_and_head_read():
    base, model = adapted(targets=(), trainable_token_indices=(1, 5, 12))
    randomize_added(model)
    assert isinstance(model.lm_head, lora_extras.TiedHead) and model.lm_head._source is model.wte
    table = host(base.wte.weight.data).copy()
    table[[1, 5, 12]] = host(model.wte.token_values.data)
    assert gc.rel_error(logits(model), logits(with_table(base, table))) <= 1e-12
    assert np.array_equal(host(model.wte.weight.data), host(base.wte.weight.data)) and not model.wte.weight.trainable


@pytest.mark.parametrize("tying", [False, True])
def test_a_saved_wte_feeds_the_embedding_while_the_head_reads_the_original(tying):
    base, model = adapted(targets=(), modules_to_save=("wte",), ensure_weight_tying=tying)
    randomize_added(model)
    assert model.lm_head is None
    copy = host(model.wte.copy.weight.data)
    h = hidden(model)
    assert gc.rel_error(h, hidden(with_table(base, copy))) <= 1e-12
    assert gc.rel_error(logits(model), h @ host(base.wte.weight.data).T) <= 1e-12


def test_lora_on_wte_changes_the_embedding_while_the_head_reads_the_original():
    base, model = adapted(targets=("wte",))
    randomize_added(model)
    table = host(base.wte.weight.data) + host(model.wte.delta_weight())
    h = hidden(model)
    assert gc.rel_error(h, hidden(with_table(base, table))) <= 1e-12
    assert gc.rel_error(logits(model), h @ host(base.wte.weight.data).T) <= 1e-12


@pytest.mark.parametrize("saved", [("lm_head",), ("wte", "lm_head")])
def test_a_saved_lm_head_is_a_head_of_its_own(saved):
    base, model = adapted(targets=(), modules_to_save=saved)
    randomize_added(model)
    assert isinstance(model.lm_head, lora_extras.OutputHead)
    embedding = host(model.wte.copy.weight.data) if "wte" in saved else host(base.wte.weight.data)
    h = hidden(model)
    assert gc.rel_error(h, hidden(with_table(base, embedding))) <= 1e-12
    assert gc.rel_error(logits(model), h @ host(model.lm_head.weight.data).T) <= 1e-12


@pytest.mark.parametrize("saved", [("lm_head",), ("wte", "lm_head")])
def test_a_tied_lm_head_and_the_embedding_share_one_trained_copy(saved):
    base, model = adapted(targets=(), modules_to_save=saved, ensure_weight_tying=True)
    assert isinstance(model.lm_head, lora_extras.TiedHead) and model.lm_head._source is model.wte
    assert not [n for n, _ in model.named_parameters() if n.startswith("lm_head")]
    assert [n for n, _ in model.named_parameters(trainable_only=True)] == ["wte.copy.weight"]
    randomize_added(model)
    copy = host(model.wte.copy.weight.data)
    assert gc.rel_error(logits(model), logits(with_table(base, copy))) <= 1e-12
    assert np.array_equal(host(model.wte.weight.data), host(base.wte.weight.data))


# ----------------------------------------------------------------------------------------------------
# merge


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith("lora on")])
def test_merged_equals_unmerged_and_unmerge_restores_every_weight(kind):
    _, model = adapted(kind)
    randomize_added(model)
    before = {n: host(p.data).copy() for n, p in model.named_parameters()}
    unmerged = logits(model)
    ml.merge_lora(model)
    assert gc.rel_error(logits(model), unmerged) <= 1e-12
    if kind == "lora_bias":      # the bias holds s b_B now
        assert not np.array_equal(host(model.h[0].mlp.fc.bias.data), before["h.0.mlp.fc.bias"])
    ml.unmerge_lora(model)
    for n, p in model.named_parameters():
        assert np.array_equal(host(p.data), before[n]), n        # weights and biases, bit for bit


@pytest.mark.parametrize("kind, match", [("lora on wte", "cannot merge: wte .*head"), ("lora on wpe", "cannot merge: wpe")])
def test_merge_with_lora_on_a_table_is_refused_and_changes_nothing(kind, match):
    _, model = adapted(kind)
    randomize_added(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        ml.merge_lora(model)
    assert_unchanged(model, before)
    assert not any(m.merged for _, m in ml.lora.lora_modules(model))


# ----------------------------------------------------------------------------------------------------
# minilora's adapter files


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_file_round_trip_is_exact(kind, tmp_path):
    base, model = adapted(kind)
    randomize_added(model)
    ml.save_lora(model, tmp_path)
    fresh = ml.load_lora(copy_of(base), tmp_path)
    assert np.array_equal(logits(fresh), logits(model))
    assert [n for n, _ in fresh.named_parameters(trainable_only=True)] == \
        [n for n, _ in model.named_parameters(trainable_only=True)]


@pytest.mark.parametrize("saved, claimed, match", [
    (dict(trainable_token_indices=(1, 5)), dict(trainable_token_indices=(1, 5, 7)),
     r"wte.token_values has shape \(2, 12\), the model needs \(3, 12\)"),
    (dict(modules_to_save=("ln_f",)), dict(modules_to_save=("ln_f", "lm_head")), "missing lm_head.weight"),
    (dict(modules_to_save=("lm_head",), ensure_weight_tying=True), dict(modules_to_save=("lm_head",)),
     r"missing lm_head.weight; unexpected tensors \['wte.copy.weight'\]"),
    (dict(modules_to_save=("wte", "lm_head")), dict(modules_to_save=("wte",)), r"unexpected tensors \['lm_head.weight'\]"),
    (dict(targets=("q_proj", "wte")), dict(targets=("q_proj",)),
     r"unexpected tensors \['wte.lora_embedding_A', 'wte.lora_embedding_B'\]"),
    (dict(lora_bias=True), dict(), r"unexpected tensors \['h.0.attn.q_proj.lora_bias'"),
])
def test_adapter_file_that_does_not_fit_its_config_is_refused(saved, claimed, match, tmp_path):
    base, model = adapted(**saved)
    model.lora_config = lora_config(**claimed)     # the file's configuration then disagrees with its tensors
    ml.save_lora(model, tmp_path)
    fresh = copy_of(base)
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        ml.load_lora(fresh, tmp_path)
    assert_unchanged(fresh, before)


# ----------------------------------------------------------------------------------------------------
# bad configs


@pytest.mark.parametrize("fields, match", [
    (dict(targets=("q_proj", "wte"), use_dora=True), "use_dora and lora_bias act on linear layers only"),
    (dict(targets=("wte",), lora_bias=True), "use_dora and lora_bias act on linear layers only"),
    (dict(targets=("wpe",), r=9), r"r=9 exceeds min\(rows, width\) = 8 of wpe \(8, 12\)"),
    (dict(targets=("wte",), r=13), r"r=13 exceeds min\(rows, width\) = 12 of wte \(13, 12\)"),
    (dict(modules_to_save=("ln_3",)), "modules_to_save names 'ln_3'"),
    (dict(modules_to_save=("attn",)), "modules_to_save names 'attn'"),
    (dict(trainable_token_indices=(2, 13)), "trainable token id 13 is out of range: the vocabulary has 13 tokens"),
    (dict(targets=("q_proj", "fc"), modules_to_save=("fc",)),
     r"\['h.0.mlp.fc', 'h.1.mlp.fc'\] are both LoRA targets and modules_to_save"),
    (dict(targets=("wte",), modules_to_save=("wte",)), r"\['wte'\] are both LoRA targets and modules_to_save"),
    (dict(targets=("wte",), trainable_token_indices=(1,)), "trainable tokens and LoRA or a full copy on wte"),
    (dict(modules_to_save=("wte",), trainable_token_indices=(1,)), "trainable tokens and LoRA or a full copy on wte"),
])
def test_bad_config_is_refused_and_changes_nothing(fields, match):
    model = base_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        ml.apply_lora(model, lora_config(**fields))
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------------
# the fast path and data parallelism


@pytest.mark.parametrize("kind", ["lora on wte", "lora_bias", "trainable tokens", "saved wte and lm_head",
                                  "saved fc and ln_1", "tied lm_head"])
def test_fast_parallel_gradients_equal_the_reference(kind):
    _, model = adapted(kind)
    randomize_added(model)
    idx, targets = tokens(shape=(4, T)), tokens(1, shape=(4, T))
    with ml.use_fast(False):
        loss = train.forward_backward(model, dev(idx), dev(targets))
    expected = {n: host(p.grad).copy() for n, p in model.named_parameters(trainable_only=True)}
    model.zero_grad()
    with ml.use_fast(True):
        step = ParallelStep(model, 2)
        try:
            parallel_loss = step.forward_backward(dev(idx), dev(targets))
        finally:
            step.close()
    assert abs(parallel_loss - loss) <= 1e-12 * abs(loss)
    for n, p in model.named_parameters(trainable_only=True):
        assert gc.rel_error(p.grad, expected[n]) <= 1e-12, n


@pytest.mark.parametrize("first, second", [(dict(targets=(), modules_to_save=("ln_f",)), dict(targets=("q_proj",))),
                                           (dict(targets=("wte",)), dict(targets=("v_proj",))),
                                           (dict(targets=(), trainable_token_indices=(1,)), dict(targets=("fc",)))])
def test_applying_lora_to_a_model_adapted_only_by_extras_is_refused(first, second):
    """A second apply_lora would stack on the first whatever the first added; refused, the model unchanged."""
    model = base_model()
    ml.apply_lora(model, lora_config(**first))
    before = snapshot(model)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        ml.apply_lora(model, lora_config(**second))
    assert_unchanged(model, before)
