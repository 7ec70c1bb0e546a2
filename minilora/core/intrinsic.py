"""Intrinsic dimension (Li et al. 2018; Aghajanyan, Zettlemoyer and Gupta 2020): train in a random subspace.

All D trainable numbers of a model move together along d random directions:

    theta = theta_0 + P theta_d           theta_0: (D,) the starting weights; P: (D, d) fixed; theta_d: (d,) from 0

so only theta_d (d numbers) is trained. Its gradient is the chain rule through a linear map:

    dL/dtheta_d = P^T dL/dtheta           (the model's ordinary backward gives dL/dtheta)

The intrinsic dimension d90 of a task is the smallest d whose training reaches 90% of what training all D
numbers reaches. P is never stored as a D x d matrix unless asked for ("dense"); three kinds:

    dense     Gaussian columns scaled to unit length                       memory D d, time D d
    sparse    very sparse random signs (about sqrt(D) non-zeros a column)  memory d sqrt(D)
    fastfood  stacked blocks S H G Pi H B (Le, Sarlos and Smola 2013)      memory O(D), time O(D log d)

SAID (structure-aware intrinsic dimension, Aghajanyan et al.) spends the same d trainable numbers differently:
m of them are one learned scale per parameter tensor, the other d - m are the subspace coordinates,

    theta_i = theta_0,i + lambda_i (P theta_(d-m))_i       i = 1..m, P: (D, d - m)

(see SubspaceModel).
"""
from __future__ import annotations

import math

import numpy

from . import backend
from .nn import Module, Parameter, dropout_generators

DENSE_LIMIT_BYTES = 2 << 30      # a dense P larger than this is refused (use "sparse" or "fastfood")


# ----------------------------------------------------------------------------------------------------
# the fast Walsh-Hadamard transform


def fwht(x):
    """Unnormalised Walsh-Hadamard transform along the last axis (length a power of two), in O(n log n).

    x: (..., n). Returns H x with H the n x n matrix of +-1 entries, H = [[H', H'], [H', -H']]; H H = n I.
    Each pass combines pairs (a, b) at distance h into (a + b, a - b), h = 1, 2, 4, ..., n / 2.
    """
    xp = backend.get_array_module(x)
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length; got {n}")
    lead = x.shape[:-1]
    y = xp.array(x, copy=True)
    h = 1
    while h < n:
        pairs = y.reshape(*lead, n // (2 * h), 2, h)       # (..., groups, 2, h): a = [..., 0, :], b = [..., 1, :]
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = xp.stack((a + b, a - b), axis=-2).reshape(*lead, n)
        h *= 2
    return y


# ----------------------------------------------------------------------------------------------------
# projections: project(theta_d) = P theta_d (D,), transpose(g) = P^T g (d,)


class DenseProjection:
    """P (D, d) with N(0, 1) entries, each column scaled to unit length."""

    def __init__(self, D: int, d: int, seed: int = 0, dtype="float64"):
        nbytes = D * d * numpy.dtype(dtype).itemsize
        if nbytes > DENSE_LIMIT_BYTES:
            raise ValueError(f"a dense projection of D={D:,} x d={d:,} needs {nbytes / 2**30:.1f} GiB "
                             f"(limit {DENSE_LIMIT_BYTES / 2**30:.0f} GiB); use 'sparse' or 'fastfood'")
        P = numpy.random.default_rng(seed).standard_normal((D, d))
        P /= numpy.linalg.norm(P, axis=0, keepdims=True)
        self.D, self.d, self.P = D, d, backend.asarray(P.astype(dtype))

    def project(self, theta_d):
        return self.P @ theta_d

    def transpose(self, g):
        return self.P.T @ g


class SparseProjection:
    """A very sparse random projection (Li, Hastie and Church 2006): each entry is non-zero with probability
    density (default 1/sqrt(D)), a random sign; columns scaled to unit length. Stored as (row, column, value)."""

    def __init__(self, D: int, d: int, seed: int = 0, density: float | None = None, dtype="float64"):
        rng = numpy.random.default_rng(seed)
        density = density if density is not None else 1.0 / math.sqrt(D)
        per_column = max(1, int(round(density * D)))
        rows = numpy.concatenate([rng.choice(D, size=per_column, replace=False) for _ in range(d)])
        cols = numpy.repeat(numpy.arange(d), per_column)
        vals = rng.choice((-1.0, 1.0), size=rows.size) / math.sqrt(per_column)     # unit-length columns
        self.D, self.d = D, d
        self.rows, self.cols = backend.asarray(rows), backend.asarray(cols)
        self.vals = backend.asarray(vals.astype(dtype))

    def project(self, theta_d):
        xp = backend.get_array_module(theta_d)
        out = xp.zeros(self.D, dtype=theta_d.dtype)
        xp.add.at(out, self.rows, self.vals * theta_d[self.cols])                # out[row] += val * theta[col]
        return out

    def transpose(self, g):
        xp = backend.get_array_module(g)
        out = xp.zeros(self.d, dtype=g.dtype)
        xp.add.at(out, self.cols, self.vals * g[self.rows])                      # out[col] += val * g[row]
        return out


class FastfoodProjection:
    """Fastfood (Le, Sarlos and Smola 2013) as a (D, d) projection, never formed.

    Block size n = the smallest power of two >= d; m = ceil(D / n) blocks. Block b is the n x n matrix

        V_b = S_b H G_b Pi_b H B_b

    with, all n x n: B_b = diag(B[b]) random signs +-1; H the unnormalised Walsh-Hadamard matrix (entries +-1,
    symmetric, H H = n I; applied by ``fwht``); Pi_b the permutation matrix with (Pi_b x)_i = x_perm[b, i];
    G_b = diag(G[b]) standard normal; S_b = scale[b] I a scalar. The projection stacks the blocks and keeps
    the first D rows and the first d columns:

        P = [V_1; V_2; ...; V_m][:D, :d]      i.e. theta_d is padded with n - d zeros, every block maps the same
                                              padded vector, and the m n outputs are cut to D

    Normalisation. H B_b e_j = B_b,jj (column j of H) has entries +-1, Pi_b keeps them +-1, G_b scales entry k
    by G_b,k (squared length ||G_b||^2), and H multiplies squared lengths by n (H^T H = n I). So every column
    of H G_b Pi_b H B_b has squared length exactly n ||G_b||^2, and scale[b] = 1 / sqrt(n ||G_b||^2 m) gives
    every column of every block squared length 1 / m, and every column of the m n-row stack unit length: the
    directions have unit length as Li et al.'s dense columns do, so a step in theta_d moves theta by the same
    distance whatever d and the projection kind. Le et al.'s S is a diagonal that gives the rows the lengths
    of Gaussian rows (for kernel features); here only the columns matter, so S_b is the scalar above.
    Truncation to D rows drops the last m n - D (< n) rows, all in the last block: a column of P keeps squared
    length 1 exactly when n divides D, and 1 minus what the dropped rows held otherwise (D / (m n) on average
    over the signs of G).

    Stacking blocks of size n ~ d follows Le et al.; the public intrinsic-dimension code instead uses one block
    with n the power of two >= D (theta_d padded to n). Both are Fastfood matrices; blocks of n ~ d keep each
    transform short. Memory O(D) (B, G, perm: m n < D + n numbers each); time O(D log n) per product.
    """

    def __init__(self, D: int, d: int, seed: int = 0, dtype="float64"):
        rng = numpy.random.default_rng(seed)
        n = 1 << max(0, (d - 1).bit_length())
        m = -(-D // n)                                       # blocks to cover D rows
        self.D, self.d, self.n, self.m = D, d, n, m
        B = rng.choice((-1.0, 1.0), size=(m, n))
        perm = numpy.stack([rng.permutation(n) for _ in range(m)])
        G = rng.standard_normal((m, n))
        scale = 1.0 / numpy.sqrt(n * (G * G).sum(axis=1) * m)
        self.B, self.G, self.scale = (backend.asarray(a.astype(dtype)) for a in (B, G, scale))
        self.perm = backend.asarray(perm)
        self.inverse_perm = backend.asarray(numpy.argsort(perm, axis=1))

    def project(self, theta_d):
        xp = backend.get_array_module(theta_d)
        x = xp.zeros((self.m, self.n), dtype=theta_d.dtype)
        x[:, :self.d] = theta_d                              # pad to n, one copy per block
        x = fwht(x * self.B)                                 # H B x
        x = xp.take_along_axis(x, self.perm, axis=1)         # Pi
        x = fwht(x * self.G)                                 # H G
        return (x * self.scale[:, None]).reshape(-1)[:self.D]

    def transpose(self, g):
        xp = backend.get_array_module(g)
        y = xp.zeros(self.m * self.n, dtype=g.dtype)
        y[:self.D] = g                                       # the truncated rows contributed nothing
        y = y.reshape(self.m, self.n) * self.scale[:, None]
        y = fwht(y) * self.G                                 # (H G)^T = G H  (H is symmetric)
        y = xp.take_along_axis(y, self.inverse_perm, axis=1)  # Pi^T = Pi^-1
        y = fwht(y) * self.B                                 # (H B)^T = B H
        return y.sum(axis=0)[:self.d]                        # blocks stacked vertically: their transposes add


PROJECTIONS = {"dense": DenseProjection, "sparse": SparseProjection, "fastfood": FastfoodProjection}


def make_projection(kind: str, D: int, d: int, seed: int = 0, dtype="float64"):
    """A projection by name ("dense", "sparse" or "fastfood") from d to D dimensions."""
    if kind not in PROJECTIONS:
        raise ValueError(f"unknown projection {kind!r}; expected one of {sorted(PROJECTIONS)}")
    for name, value in (("D", D), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    if d > D:
        raise ValueError(f"the subspace dimension d={d} exceeds the number of parameters D={D}")
    return PROJECTIONS[kind](D, d, seed=seed, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# a model trained in a random subspace


class SubspaceModel(Module):
    """Wrap a model so that its only trainable parameters are d numbers: theta_d alone (DID), or theta_d and one
    lambda per parameter tensor (SAID), d in total either way.

    DID (said=False), Li et al.'s "direct intrinsic dimension":

        theta = theta_0 + P theta_d                       theta_d: (d,), P: (D, d)

    SAID (said=True), Aghajanyan, Zettlemoyer and Gupta 2020's structure-aware variant, with m = the number of
    trainable parameter tensors of ``model`` (each weight and each bias is one tensor i, its slice of the flat
    theta; the paper's "m = number of layers" is per tensor in the implementations we know):

        theta_i = theta_0,i + lambda_i (P theta_(d-m))_i      theta_d here: (d - m,), lambdas: (m,), P: (D, d - m)

    so the trainable count is (d - m) + m = d, as the paper defines it; d <= m is refused. theta_d starts at 0
    and every lambda at 1, the start of the public SAID code, and the one that works: at theta_d = 0 the model
    is the starting one whatever lambda is; with lambda = 1 the first step moves theta_d as DID would
    (dL/dlambda_i = <dL/dtheta_i, (P theta_d)_i> is 0 there, so the lambdas start moving one step later); and
    lambda = 0 would freeze both (dL/dtheta_d = P^T (lambda * dL/dtheta) would be 0 too). One P serves every
    tensor: tensor i's rows of P are its P_i.

    ``forward``/``backward`` look like the wrapped model's, so ``train.fit`` and ``train.evaluate`` work
    unchanged. At theta_d = 0 the wrapped model is exactly the original one. D, d (the trainable count), m
    (lambdas: 0 for DID) and said are attributes.
    """

    def __init__(self, model: Module, d: int, projection: str = "fastfood", said: bool = False, seed: int = 0):
        params = model.parameters(trainable_only=True)
        if not params:
            raise ValueError("the model has no trainable parameters to reparameterise")
        if isinstance(d, bool) or not isinstance(d, (int, numpy.integer)) or d < 1:
            raise ValueError(f"d must be an int >= 1 (the number of trainable numbers); got {d!r}")
        m = len(params) if said else 0
        if said and d <= m:
            raise ValueError(f"SAID trains d numbers in total: one lambda for each of the m = {m} parameter "
                             f"tensors and d - m subspace coordinates, so it needs d > m; got d = {d}, m = {m}")
        self._model = model
        self._params = params
        self._sizes = [p.size for p in params]
        self._offsets = numpy.cumsum([0] + self._sizes)
        D = int(self._offsets[-1])
        dtype = params[0].data.dtype
        self._theta0 = [p.data.copy() for p in params]
        self._projection = make_projection(projection, D, d - m, seed=seed, dtype=dtype)
        xp = backend.get_array_module(params[0].data)
        self.theta_d = Parameter(xp.zeros(d - m, dtype=dtype))
        self.lambdas = Parameter(xp.ones(m, dtype=dtype)) if said else None
        self.config = getattr(model, "config", None)
        self.D, self.d, self.m, self.said = D, int(d), m, said

    def generators(self) -> list:
        """The wrapped model's random generators (it is held privately, so the module walk does not see it)."""
        return dropout_generators(self._model)

    def train(self, mode: bool = True):
        self._model.train(mode)
        self.training = mode
        return self

    def _offset_vector(self):
        """(P theta_d) as a (D,) vector."""
        return self._projection.project(self.theta_d.data)

    def _write_weights(self):
        """theta_i = theta_0,i + lambda_i (P theta_d)_i for every tensor i of the wrapped model (lambda_i = 1
        for DID)."""
        offset = self._offset_vector()                                      # (D,) P theta_d
        for i, (p, p0) in enumerate(zip(self._params, self._theta0)):
            piece = offset[self._offsets[i]:self._offsets[i + 1]].reshape(p.shape)   # (P theta_d)_i
            if self.lambdas is not None:
                piece = piece * self.lambdas.data[i]
            p.data[...] = p0 + piece
        return offset

    def forward(self, idx):
        self._cache = self._write_weights()
        return self._model.forward(idx)

    def backward(self, dout):
        offset = self._pop_cache()                                          # (D,) P theta_d of the forward
        for p in self._params:
            p.grad = None
        self._model.backward(dout)
        xp = backend.get_array_module(offset)
        grads = [p.grad.reshape(-1) if p.grad is not None else xp.zeros(p.size, dtype=offset.dtype)
                 for p in self._params]
        g = xp.concatenate(grads)                                           # (D,) dL/dtheta
        if self.lambdas is not None:
            # fwd: theta_i = theta_0,i + lambda_i (P theta_d)_i, so dL/dlambda_i = <dL/dtheta_i, (P theta_d)_i>
            dlam = xp.stack([g[self._offsets[i]:self._offsets[i + 1]] @ offset[self._offsets[i]:self._offsets[i + 1]]
                             for i in range(len(self._params))])           # (m,)
            self.lambdas.accumulate_grad(dlam)
            # ... and dL/d(P theta_d)_i = lambda_i dL/dtheta_i
            g = g * xp.repeat(self.lambdas.data, self._sizes)
        self.theta_d.accumulate_grad(self._projection.transpose(g))         # fwd: offset = P theta_d
        for p in self._params:
            p.grad = None
        return None
