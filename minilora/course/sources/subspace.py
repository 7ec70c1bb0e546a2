"""Assignment "subspace": training in a random subspace with a Fastfood projection (Li et al. 2018).

All D numbers of a model move together along d random directions, and only theta_d (d numbers) is trained:

    theta = theta0 + P theta_d        theta0: (D,) the starting weights; P: (D, d) fixed, never stored

The chain rule through the linear map gives the gradient: dL/dtheta_d = P^T dL/dtheta.

Fastfood (Le, Sarlos and Smola 2013) makes P from m stacked n x n blocks, n = 2^k >= d, truncated to D rows:

    V_b = scale_b H G_b Pi_b H B_b        H: the n x n Walsh-Hadamard matrix; B_b: a diagonal of random signs;
                                          Pi_b: a random permutation; G_b: a Gaussian diagonal

so P theta_d costs O(D log n) time and O(D) memory. The definitions are minilora.intrinsic's; the grader
passes your functions objects with the fields of Fastfood below, drawn as make_fastfood draws them.

Graded items (one function each): fwht, fastfood_project, fastfood_transpose, subspace_loss_and_grad.
Grade yourself with

    python subspace.py               (or: minilora assignment grade subspace subspace.py)
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class Fastfood:
    """The random parts of a Fastfood projection from d to D dimensions (given).

    D, d: the sizes; n = 2^k >= d the block size; m = ceil(D / n) the number of blocks.
    B: (m, n) random signs; G: (m, n) Gaussian; scale: (m,) one factor per block;
    perm: (m, n) integers, row b a permutation of 0..n-1 (Pi_b x = x[perm[b]]); inverse_perm: its inverse.
    """

    D: int
    d: int
    n: int
    m: int
    B: np.ndarray
    G: np.ndarray
    scale: np.ndarray
    perm: np.ndarray
    inverse_perm: np.ndarray


def make_fastfood(D, d, seed=0):
    """Draw a Fastfood projection: the same numbers as minilora.intrinsic.FastfoodProjection(D, d, seed)."""
    rng = np.random.default_rng(seed)
    n = 1 << max(0, (d - 1).bit_length())                 # the smallest power of two >= d
    m = -(-D // n)                                         # blocks to cover D rows
    B = rng.choice((-1.0, 1.0), size=(m, n))
    perm = np.stack([rng.permutation(n) for _ in range(m)])
    G = rng.standard_normal((m, n))
    scale = 1.0 / np.sqrt(n * (G * G).sum(axis=1) * m)    # unit-length columns of P (when n divides D)
    return Fastfood(D, d, n, m, B, G, scale, perm, np.argsort(perm, axis=1))


# ----------------------------------------------------------------------------------------------------
# the fast Walsh-Hadamard transform


def fwht(x):
    """Unnormalised Walsh-Hadamard transform along the last axis, in O(n log n).

    x: (..., n), n a power of two (raise ValueError naming n otherwise). Returns H x: (..., n), a new array
    (x is left unchanged), where H_1 = [[1]] and H_2n = [[H_n, H_n], [H_n, -H_n]]; H is symmetric, H H = n I.
    Hint: one pass per power of two h = 1, 2, 4, ..., n / 2 turns each pair (a, b) of entries at distance h
    (within groups of 2h) into (a + b, a - b).
    """
    # BEGIN SOLUTION
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two length; got {n}")
    lead = x.shape[:-1]
    y = np.array(x, dtype=float, copy=True)
    h = 1
    while h < n:
        pairs = y.reshape(*lead, n // (2 * h), 2, h)       # (..., groups, 2, h): a = [..., 0, :], b = [..., 1, :]
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = np.stack((a + b, a - b), axis=-2).reshape(*lead, n)
        h *= 2
    return y
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# the projection and its transpose


def fastfood_project(ff, theta_d):
    """P theta_d: (D,), for theta_d: (d,).

    Each block b: pad theta_d with zeros to n, then apply B_b, H, Pi_b, G_b, H and scale_b in that order;
    stack the m blocks' outputs (m * n numbers) and keep the first D.
    """
    # BEGIN SOLUTION
    x = np.zeros((ff.m, ff.n))
    x[:, :ff.d] = theta_d                                  # (m, n) padded, one copy per block
    x = fwht(x * ff.B)                                     # H B x
    x = np.take_along_axis(x, ff.perm, axis=1)             # Pi
    x = fwht(x * ff.G)                                     # H G
    return (x * ff.scale[:, None]).reshape(-1)[:ff.D]      # scale, stack, truncate to D rows
    # END SOLUTION


def fastfood_transpose(ff, g):
    """P^T g: (d,), for g: (D,). The adjoint of fastfood_project: <P x, g> = <x, P^T g> for every x, g.

    Hint: transpose each step and reverse their order. H is symmetric, a diagonal is its own transpose,
    Pi^T = Pi^-1 (use inverse_perm), truncating to D rows transposes to padding g with zeros, and the blocks
    are stacked vertically, so their transposes add.
    """
    # BEGIN SOLUTION
    y = np.zeros(ff.m * ff.n)
    y[:ff.D] = g                                           # the truncated rows contributed nothing
    y = y.reshape(ff.m, ff.n) * ff.scale[:, None]          # (m, n)
    y = fwht(y) * ff.G                                     # (H G)^T = G H
    y = np.take_along_axis(y, ff.inverse_perm, axis=1)     # Pi^T = Pi^-1
    y = fwht(y) * ff.B                                     # (H B)^T = B H
    return y.sum(axis=0)[:ff.d]                            # blocks' transposes add; drop the padding
    # END SOLUTION


# ----------------------------------------------------------------------------------------------------
# a model trained in the subspace: least squares


def subspace_loss_and_grad(ff, theta0, theta_d, X, y):
    """Loss and gradient of least squares trained in the subspace.

    theta = theta0 + P theta_d;  loss = 0.5 * mean((X theta - y)^2).
    ff: the projection (use fastfood_project and fastfood_transpose); theta0: (D,); theta_d: (d,);
    X: (N, D) inputs; y: (N,) targets. Returns loss (a float) and dloss/dtheta_d: (d,).
    """
    # BEGIN SOLUTION
    theta = theta0 + fastfood_project(ff, theta_d)         # (D,)
    residual = X @ theta - y                               # (N,)
    loss = 0.5 * float(np.mean(residual ** 2))
    dtheta = X.T @ residual / X.shape[0]                   # (D,) fwd: loss = 0.5 mean(residual^2)
    return loss, fastfood_transpose(ff, dtheta)            # fwd: theta = theta0 + P theta_d
    # END SOLUTION


if __name__ == "__main__":
    from minilora.course import format_report, grade

    print(format_report(grade("subspace", __file__)))
