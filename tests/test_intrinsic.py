"""Intrinsic dimension core: the Walsh-Hadamard transform, the three projections, make_projection and
SubspaceModel (exactness at theta_d = 0, gradients of theta_d and SAID's lambdas, training through fit)."""
import numpy
import pytest

import minilora
from minilora import backend, intrinsic
from minilora.data import encode, toy_text
from minilora.gradcheck import THRESHOLD, directional_check, gpt_loss_fn, numerical_gradient, randomize_parameters, rel_error
from minilora.intrinsic import SubspaceModel, fwht, make_projection
from minilora.train import TrainConfig, fit

KINDS = ("dense", "sparse", "fastfood")


def hadamard(n):
    H = numpy.ones((1, 1))
    while H.shape[0] < n:
        H = numpy.block([[H, H], [H, -H]])
    return H


def explicit(P):
    """The (D, d) matrix a projection implies, column j = project(e_j)."""
    return numpy.stack([P.project(numpy.eye(P.d)[j]) for j in range(P.d)], axis=1)


# ----------------------------------------------------------------------------------------------------
# fwht


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 64])
def test_fwht_matches_the_explicit_hadamard_matrix(n):
    x = numpy.random.default_rng(n).standard_normal((3, n))
    H = hadamard(n)
    numpy.testing.assert_allclose(fwht(x), x @ H.T, atol=1e-12)
    numpy.testing.assert_allclose(H @ H, n * numpy.eye(n))
    numpy.testing.assert_allclose(fwht(fwht(x)), n * x, atol=1e-11)       # H H = n I


def test_fwht_leaves_its_input_alone_and_rejects_other_lengths():
    x = numpy.arange(8.0)
    before = x.copy()
    fwht(x)
    assert numpy.array_equal(x, before)
    for n in (3, 6, 12, 100):
        with pytest.raises(ValueError, match="power-of-two"):
            fwht(numpy.ones(n))


# ----------------------------------------------------------------------------------------------------
# projections


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("D,d", [(37, 5), (64, 8), (1000, 10), (300, 300)])
@pytest.mark.usefixtures("on_numpy")
def test_adjoint_identity(kind, D, d):
    P = make_projection(kind, D, d, seed=3)
    rng = numpy.random.default_rng(0)
    x, y = rng.standard_normal(d), rng.standard_normal(D)
    px = P.project(x)
    pty = P.transpose(y)
    assert px.shape == (D,) and pty.shape == (d,)
    assert abs(px @ y - x @ pty) <= 1e-12 * max(1.0, abs(px @ y))


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.usefixtures("on_numpy")
def test_dense_and_sparse_columns_have_unit_norm(kind):
    M = explicit(make_projection(kind, 400, 12, seed=1))
    numpy.testing.assert_allclose(numpy.linalg.norm(M, axis=0), 1.0, atol=1e-12)


@pytest.mark.usefixtures("on_numpy")
def test_fastfood_columns_unit_norm_exactly_when_n_divides_D_and_on_average_otherwise():
    M = explicit(make_projection("fastfood", 64, 8, seed=1))          # n = 8 divides 64
    numpy.testing.assert_allclose(numpy.linalg.norm(M, axis=0), 1.0, atol=1e-12)
    M = explicit(make_projection("fastfood", 1000, 10, seed=1))       # n = 16, 1000 = 62.5 blocks
    assert abs((M * M).sum(axis=0).mean() - 1.0) < 0.05


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.usefixtures("on_numpy")
def test_transpose_is_the_transpose_of_the_explicit_matrix(kind):
    P = make_projection(kind, 50, 6, seed=2)
    M = explicit(P)
    rng = numpy.random.default_rng(1)
    for _ in range(3):
        g, x = rng.standard_normal(50), rng.standard_normal(6)
        numpy.testing.assert_allclose(P.transpose(g), M.T @ g, atol=1e-12)
        numpy.testing.assert_allclose(P.project(x), M @ x, atol=1e-12)


@pytest.mark.usefixtures("on_numpy")
def test_fastfood_is_the_product_of_its_factors():
    P = make_projection("fastfood", 16, 4, seed=5)                     # n = 4, m = 4 blocks
    n = P.n
    H = hadamard(n)
    blocks = []
    for b in range(P.m):
        Pi = numpy.eye(n)[P.perm[b]]                                   # (Pi x)_i = x_perm[i]
        blocks.append(P.scale[b] * H @ numpy.diag(P.G[b]) @ Pi @ H @ numpy.diag(P.B[b]))
    V = numpy.concatenate(blocks)[:16, :4]
    numpy.testing.assert_allclose(explicit(P), V, atol=1e-12)


def test_make_projection_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown projection"):
        make_projection("gaussian", 10, 2)
    with pytest.raises(ValueError, match="exceeds"):
        make_projection("fastfood", 10, 11)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            make_projection("dense", 10, bad)
    monkeypatch.setattr(intrinsic, "DENSE_LIMIT_BYTES", 1000)
    with pytest.raises(ValueError, match="dense projection"):
        make_projection("dense", 100, 10)                              # 8000 bytes
    make_projection("dense", 100, 1)                                   # 800 bytes: fine
    make_projection("fastfood", 100, 10)                               # never stores P


# ----------------------------------------------------------------------------------------------------
# SubspaceModel on a tiny float64 GPT


def tiny_gpt(seed=0):
    model = minilora.GPT(minilora.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=12),
                         dtype="float64")
    randomize_parameters(model, seed=seed)
    return model


def batch(seed=0):
    rng = numpy.random.default_rng(seed)
    return rng.integers(0, 11, size=(2, 8)), rng.integers(0, 11, size=(2, 8))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("said", [False, True])
def test_subspace_model_at_zero_is_the_base_model(kind, said):
    idx, _ = batch()
    base = tiny_gpt()
    expected = base.forward(idx)
    wrapped = SubspaceModel(tiny_gpt(), 7, projection=kind, said=said, seed=1)
    assert numpy.array_equal(wrapped.forward(idx), expected)
    trainable = wrapped.parameters(trainable_only=True)
    assert trainable == ([wrapped.theta_d, wrapped.lambdas] if said else [wrapped.theta_d])
    assert wrapped.num_parameters(trainable_only=True) == 7 + (len(base.parameters()) if said else 0)
    assert wrapped.D == base.num_parameters()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("said", [False, True])
def test_subspace_model_directional_gradient(kind, said):
    idx, targets = batch(1)
    wrapped = SubspaceModel(tiny_gpt(), 9, projection=kind, said=said, seed=2)
    rng = numpy.random.default_rng(3)
    wrapped.theta_d.data[...] = backend.asarray(0.3 * rng.standard_normal(9))
    if said:
        wrapped.lambdas.data[...] = backend.asarray(1.0 + 0.5 * rng.standard_normal(wrapped.lambdas.size))
    for seed in range(2):
        check = directional_check(wrapped, gpt_loss_fn(idx, targets), seed=seed)
        assert check.rel_error <= THRESHOLD, check


@pytest.mark.parametrize("kind", KINDS)
def test_subspace_model_elementwise_gradient(kind):
    idx, targets = batch(2)
    wrapped = SubspaceModel(tiny_gpt(), 4, projection=kind, said=True, seed=4)
    rng = numpy.random.default_rng(5)
    wrapped.theta_d.data[...] = backend.asarray(0.3 * rng.standard_normal(4))
    wrapped.lambdas.data[...] = backend.asarray(1.0 + 0.5 * rng.standard_normal(wrapped.lambdas.size))
    loss_fn = gpt_loss_fn(idx, targets)
    wrapped.zero_grad()
    loss_fn(wrapped)
    analytic = wrapped.theta_d.grad.copy()
    analytic_lambdas = wrapped.lambdas.grad.copy()

    def at(param):
        def f(v):
            old = param.data.copy()
            param.data[...] = v
            try:
                return loss_fn(wrapped, backward=False)
            finally:
                param.data[...] = old
        return f

    assert rel_error(analytic, numerical_gradient(at(wrapped.theta_d), wrapped.theta_d.data)) <= THRESHOLD
    numeric_lambdas = numerical_gradient(at(wrapped.lambdas), wrapped.lambdas.data)
    assert rel_error(analytic_lambdas, numeric_lambdas) <= THRESHOLD


def test_subspace_model_leaves_the_base_parameters_without_gradients():
    idx, targets = batch()
    base = tiny_gpt()
    wrapped = SubspaceModel(base, 5, seed=0)
    gpt_loss_fn(idx, targets)(wrapped)
    assert wrapped.theta_d.grad is not None and wrapped.theta_d.grad.shape == (5,)
    assert all(p.grad is None for p in base.parameters())


def test_subspace_training_with_fit_lowers_the_loss():
    ids = encode(toy_text("copy", n_lines=300, seed=0))
    base = minilora.GPT(minilora.GPTConfig(vocab_size=96, block_size=16, n_layer=1, n_head=2, n_embd=16), seed=0)
    wrapped = SubspaceModel(base, 50, projection="fastfood", seed=0)
    config = TrainConfig(steps=40, batch_size=8, lr=0.05, min_lr=0.005, warmup_steps=0, weight_decay=0.0,
                         eval_every=0, checkpoint_every=0, quiet=True)
    result = fit(wrapped, ids, config=config)
    first = numpy.mean([loss for _, loss in result.train[:5]])
    last = numpy.mean([loss for _, loss in result.train[-5:]])
    assert last < first - 0.1, (first, last)
