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


def fastfood_dense(P):
    """The (D, d) matrix a FastfoodProjection stands for, written out from its stored B, perm, G and scale:
    the stacked blocks V_b = scale_b H G_b Pi_b H B_b, shape (m n, n), cut to D rows and d columns (the
    columns past d multiply the zeros theta_d is padded with)."""
    n = P.n
    H = hadamard(n)
    blocks = []
    for b in range(P.m):
        B = numpy.diag(P.B[b])                                         # random signs
        Pi = numpy.eye(n)[P.perm[b]]                                   # (Pi x)_i = x_perm[b, i]
        G = numpy.diag(P.G[b])                                         # Gaussian diagonal
        blocks.append(P.scale[b] * H @ G @ Pi @ H @ B)                 # (n, n)
    stacked = numpy.concatenate(blocks)                                # (m n, n)
    return stacked, stacked[:P.D, :P.d]


FASTFOOD_SIZES = [(16, 4), (37, 5), (64, 8), (100, 5), (1000, 30), (300, 300), (5, 1)]


@pytest.mark.parametrize("D,d", FASTFOOD_SIZES)
@pytest.mark.usefixtures("on_numpy")
def test_fastfood_project_and_transpose_are_the_dense_matrix_of_its_factors(D, d):
    P = make_projection("fastfood", D, d, seed=D + d)
    assert P.n >= d and P.n & (P.n - 1) == 0 and (P.n == 1 or P.n // 2 < d)    # the power of two >= d
    assert P.m == -(-D // P.n)                                                 # blocks covering D rows
    _, dense = fastfood_dense(P)
    rng = numpy.random.default_rng(0)
    for _ in range(3):
        theta, g = rng.standard_normal(d), rng.standard_normal(D)
        # float64 rounding: each output is a sum of O(n) terms through two length-n transforms, so its error
        # is a small multiple of n eps times the sum of the terms' magnitudes
        bound = lambda M, v: 8 * (P.n + 4) * numpy.finfo(numpy.float64).eps * (numpy.abs(M) @ numpy.abs(v)).max()
        assert numpy.abs(P.project(theta) - dense @ theta).max() <= bound(dense, theta)
        assert numpy.abs(P.transpose(g) - dense.T @ g).max() <= bound(dense.T, g)


@pytest.mark.parametrize("D,d", FASTFOOD_SIZES)
@pytest.mark.usefixtures("on_numpy")
def test_fastfood_normalisation_gives_the_column_lengths_the_docstring_claims(D, d):
    P = make_projection("fastfood", D, d, seed=D * d)
    stacked, dense = fastfood_dense(P)
    n, m = P.n, P.m
    per_block = (stacked.reshape(m, n, n) ** 2).sum(axis=1)            # (m, n): squared column lengths per block
    numpy.testing.assert_allclose(per_block, 1.0 / m, rtol=1e-12)     # every column of every block: 1 / m
    numpy.testing.assert_allclose((stacked ** 2).sum(axis=0), 1.0, rtol=1e-12)   # the m n-row stack: 1
    dropped = (stacked[D:, :d] ** 2).sum(axis=0)                       # the rows truncation removes (< n of them)
    assert stacked.shape[0] - D < n
    numpy.testing.assert_allclose((dense ** 2).sum(axis=0), 1.0 - dropped, rtol=1e-12, atol=1e-15)
    if D % n == 0:
        numpy.testing.assert_allclose(numpy.linalg.norm(dense, axis=0), 1.0, rtol=1e-12)


@pytest.mark.usefixtures("on_numpy")
def test_fastfood_truncated_columns_have_squared_length_D_over_m_n_on_average():
    # over many draws of G the dropped rows hold (m n - D) / (m n) of a column on average
    D, d = 40, 16                                                      # n = 16, m = 3: 8 of 48 rows dropped
    lengths = numpy.concatenate([(fastfood_dense(make_projection("fastfood", D, d, seed=s))[1] ** 2).sum(axis=0)
                                 for s in range(300)])
    expected = D / (3 * 16)
    assert abs(lengths.mean() - expected) < 5 * lengths.std() / numpy.sqrt(lengths.size)


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


def tensors(model):
    """m: the number of trainable parameter tensors (one SAID lambda each)."""
    return len(model.parameters(trainable_only=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("said", [False, True])
def test_subspace_model_at_zero_is_the_base_model(kind, said):
    idx, _ = batch()
    base = tiny_gpt()
    expected = base.forward(idx)
    d = tensors(base) + 7
    wrapped = SubspaceModel(tiny_gpt(), d, projection=kind, said=said, seed=1)
    assert numpy.array_equal(wrapped.forward(idx), expected)
    trainable = wrapped.parameters(trainable_only=True)
    assert trainable == ([wrapped.theta_d, wrapped.lambdas] if said else [wrapped.theta_d])
    assert wrapped.D == base.num_parameters()


@pytest.mark.parametrize("said", [False, True])
@pytest.mark.parametrize("extra", [1, 5, 40])
def test_the_trainable_count_is_d_for_did_and_said(said, extra):
    m = tensors(tiny_gpt())
    d = m + extra
    wrapped = SubspaceModel(tiny_gpt(), d, projection="fastfood", said=said, seed=0)
    assert wrapped.num_parameters(trainable_only=True) == d == wrapped.d
    if said:
        assert wrapped.m == m and wrapped.lambdas.size == m and wrapped.theta_d.size == d - m
        assert numpy.array_equal(backend.to_numpy(wrapped.lambdas.data), numpy.ones(m))
        assert wrapped._projection.d == d - m and wrapped._projection.D == wrapped.D
    else:
        assert wrapped.m == 0 and wrapped.lambdas is None and wrapped.theta_d.size == d


def test_said_refuses_d_not_above_the_number_of_tensors():
    m = tensors(tiny_gpt())
    for d in (1, m - 1, m):
        with pytest.raises(ValueError, match=rf"d = {d}, m = {m}"):
            SubspaceModel(tiny_gpt(), d, said=True)
    SubspaceModel(tiny_gpt(), m + 1, said=True)                        # one subspace coordinate: fine
    SubspaceModel(tiny_gpt(), 1, said=False)                           # DID has no lambdas: any d >= 1
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="d must be an int"):
            SubspaceModel(tiny_gpt(), bad)


def set_away_from_start(wrapped, seed):
    """theta_d and the lambdas at non-trivial values: at theta_d = 0 the lambda gradient is 0, and at lambda = 1
    a gradient that forgot lambda would still pass."""
    rng = numpy.random.default_rng(seed)
    wrapped.theta_d.data[...] = backend.asarray(0.3 * rng.standard_normal(wrapped.theta_d.size))
    if wrapped.said:
        wrapped.lambdas.data[...] = backend.asarray(1.0 + 0.5 * rng.standard_normal(wrapped.lambdas.size))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("said", [False, True])
def test_subspace_model_directional_gradient(kind, said):
    idx, targets = batch(1)
    wrapped = SubspaceModel(tiny_gpt(), tensors(tiny_gpt()) + 9, projection=kind, said=said, seed=2)
    set_away_from_start(wrapped, 3)
    for seed in range(2):
        check = directional_check(wrapped, gpt_loss_fn(idx, targets), seed=seed)
        assert check.rel_error <= THRESHOLD, check


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("said", [False, True])
def test_subspace_model_elementwise_gradient(kind, said):
    """Every trainable number (theta_d's d - m, and SAID's m lambdas) against centred differences in float64."""
    idx, targets = batch(2)
    wrapped = SubspaceModel(tiny_gpt(), tensors(tiny_gpt()) + 4, projection=kind, said=said, seed=4)
    set_away_from_start(wrapped, 5)
    loss_fn = gpt_loss_fn(idx, targets)
    wrapped.zero_grad()
    loss_fn(wrapped)
    analytic = {name: p.grad.copy() for name, p in wrapped.named_parameters(trainable_only=True)}
    assert set(analytic) == ({"theta_d", "lambdas"} if said else {"theta_d"})

    def at(param):
        def f(v):
            old = param.data.copy()
            param.data[...] = v
            try:
                return loss_fn(wrapped, backward=False)
            finally:
                param.data[...] = old
        return f

    for name, p in list(wrapped.named_parameters(trainable_only=True)):
        assert rel_error(analytic[name], numerical_gradient(at(p), p.data)) <= THRESHOLD, name


def test_said_gradients_are_the_formulas_of_its_chain_rule():
    """dL/dlambda_i = <dL/dtheta_i, (P theta_d)_i> and dL/dtheta_d = P^T (lambda * dL/dtheta), from the base
    model's own gradient at the same weights."""
    idx, targets = batch(3)
    base = tiny_gpt()
    wrapped = SubspaceModel(tiny_gpt(), tensors(base) + 6, projection="dense", said=True, seed=6)
    set_away_from_start(wrapped, 7)
    wrapped.zero_grad()
    gpt_loss_fn(idx, targets)(wrapped)
    offset = explicit(wrapped._projection) @ wrapped.theta_d.data           # (D,) P theta_d
    lambdas = wrapped.lambdas.data
    sizes = [p.size for p in base.parameters(trainable_only=True)]
    for p, p0, lam, piece in zip(base.parameters(trainable_only=True), wrapped._theta0, lambdas,
                                 numpy.split(offset, numpy.cumsum(sizes)[:-1])):
        p.data[...] = p0 + lam * piece.reshape(p.shape)                      # the weights the wrapper writes
    base.zero_grad()
    gpt_loss_fn(idx, targets)(base)
    g = numpy.concatenate([p.grad.reshape(-1) for p in base.parameters(trainable_only=True)])
    pieces = numpy.split(g, numpy.cumsum(sizes)[:-1])
    expected_lambdas = numpy.array([gi @ oi for gi, oi in zip(pieces, numpy.split(offset, numpy.cumsum(sizes)[:-1]))])
    expected_theta = explicit(wrapped._projection).T @ (numpy.repeat(lambdas, sizes) * g)
    assert rel_error(wrapped.lambdas.grad, expected_lambdas) <= 1e-12
    assert rel_error(wrapped.theta_d.grad, expected_theta) <= 1e-12


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
