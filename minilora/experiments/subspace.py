"""Subspace similarity between LoRA adapters of different ranks (LoRA paper, section 7.2, Figure 3).

The question: when LoRA learns a rank-r update, how many of those r directions matter? If the same few
directions come out of a small-rank run and a larger-rank run, those directions are what the task needs and
the remaining ones are noise; a small r would then be enough.

The measure. A LoRA adapter's A is (r, in): it reads r directions out of the layer's input space R^in.
Write A = L S U^T (SVD, singular values in decreasing order); the columns of U (in, r) are A's right
singular vectors, an orthonormal basis of the input directions A uses, most important first. With U_i the
first i of them, the normalized subspace similarity of two adapters is

    phi(A1, A2, i, j) = ||U1_i^T U2_j||_F^2 / min(i, j)                                   in [0, 1].

||U1_i^T U2_j||_F^2 = sum over the i x j pairs of (u1_a . u2_b)^2 is the squared length of the projection of
the smaller subspace onto the larger one, so it is at most min(i, j): phi = 1 when one subspace contains the
other, phi = 0 when they are orthogonal. The same phi applies to any two orthonormal bases: here also to the
top-r left singular vectors (input directions) and right singular vectors (output directions) of the updates
Delta W = s B A themselves.

What chance gives. If U2_j spans a uniformly random j-dimensional subspace of R^d, its projector P = U2_j U2_j^T
has E[P] = (j / d) I: E[P] commutes with every rotation (the distribution does), so it is a multiple c I of
the identity, and its trace is E[trace P] = j, so c = j / d. Then for any fixed U1_i,

    E ||U1_i^T U2_j||_F^2 = E trace(U1_i^T P U1_i) = trace(U1_i^T (j / d) I U1_i) = i j / d,
    E phi = i j / (d min(i, j)) = max(i, j) / d.

So at d = n_embd = 128 chance gives phi(1, 1) = 1/128 and phi(8, 64) = 0.5. The study's random baseline is
measured, not only computed: phi between independent Gaussian matrices of the adapters' shapes, averaged over
the adapted modules as the trained numbers are, over many draws (its 95% interval, and the 2.5-97.5% range of
single draws).

When phi(1, 1) means something. "The top direction" is defined only when A's largest singular value stands
apart from the next: if the spectrum is nearly flat, any small change rotates the top singular vector inside
the near-degenerate subspace and phi(1, 1) between two runs is noise. The study therefore measures the
spectral gap s1 / s2 of every trained A and Delta W beside that of random matrices of the same shapes
(Gaussian A; a product of Gaussian factors for Delta W); where the gap is not above random, phi(1, 1) is
read as noise and the subspace-level phi(r1, r2) is the meaningful comparison.

The protocol. LoRA on {Wq, Wv} of every layer of the shipped model, python-email's declared split
(common.split), STEPS steps, at r = 8 and r = 64 (the paper's pair). Each rank's learning rate is tuned on
dev with the selection seed (common.tuned_lora); the reporting seeds' runs (on test) give the matrices. The
r = 8 run of seed k is compared with the r = 64 run of the next reporting seed (cyclically): each seed sets
A's random start, and with a shared seed the first layer's r = 8 start would be the first 8 rows of the
r = 64 start, a shared subspace that training did not make. Per pair, each statistic is averaged over the
adapted modules; intervals are over the pairs. Compared, for each pair: trained A (the paper's measure),
A - A_init (what training added to A), Delta W's input and output directions.

The paper (GPT-3, r = 8 against r = 64) finds the top direction shared, phi(1, 1) > 0.5, and the other
directions close to chance.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy

from ..core.lora import LoRAConfig, apply_lora
from ..fast.parallel import blas_threads
from ..io.pretrained import load_pretrained
from . import common, protocol

STUDY = "subspace"
TARGETS = ("q_proj", "v_proj")
R_SMALL, R_LARGE = 8, 64
STEPS = 400                 # LoRA moves A only once B is non-zero; 400 steps let A learn (default 100 is short)
FAST_STEPS = 10
RANDOM_DRAWS, FAST_RANDOM_DRAWS = 200, 20
PAPER_TOP1 = 0.5
STATES = ("A", "A - A_init", "dW in", "dW out")
STATE_LABELS = {"A": "trained A", "A - A_init": "A - A_init", "dW in": "Delta W, input directions",
                "dW out": "Delta W, output directions"}
STATS = ("top1", "top1_in_all", "square", "all")
STAT_LABELS = {"top1": "phi(1,1)", "top1_in_all": "phi(1,r2)", "square": "phi(r1,r1)", "all": "phi(r1,r2)"}

# ----------------------------------------------------------------------------------------------------
# the measure


def subspace_basis(A) -> numpy.ndarray:
    """The right singular vectors of A (r, in) as columns, most important first: U (in, r), U^T U = I."""
    A = numpy.asarray(A, dtype=numpy.float64)
    if A.ndim != 2:
        raise ValueError(f"A must be a 2-D (r, in) matrix; got shape {A.shape}")
    _, _, Vt = numpy.linalg.svd(A, full_matrices=False)    # A = L S Vt, Vt: (min(r, in), in)
    return Vt.T                                              # (in, r)


def update_bases(delta, r: int):
    """The top-r singular vectors of an update delta (in, out), W's layout: (input directions (in, r), output
    directions (out, r)), most important first."""
    delta = numpy.asarray(delta, dtype=numpy.float64)
    if delta.ndim != 2 or not 1 <= r <= min(delta.shape):
        raise ValueError(f"need a 2-D update and 1 <= r <= min(shape); got shape {delta.shape}, r = {r}")
    U, _, Vt = numpy.linalg.svd(delta, full_matrices=False)   # delta = U S Vt
    return U[:, :r], Vt[:r].T


def phi_of_bases(U1, U2) -> numpy.ndarray:
    """phi for every i, j from two orthonormal bases U1 (d, r1), U2 (d, r2), columns most important first:
    an (r1, r2) array, entry [i-1, j-1] = ||U1_i^T U2_j||_F^2 / min(i, j)."""
    U1, U2 = numpy.asarray(U1, dtype=numpy.float64), numpy.asarray(U2, dtype=numpy.float64)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(f"A1 and A2 must read the same input space; got in = {U1.shape[0]} and {U2.shape[0]}")
    overlap = (U1.T @ U2) ** 2                               # (r1, r2): (u1_a . u2_b)^2
    squared_norms = overlap.cumsum(axis=0).cumsum(axis=1)    # [i-1, j-1] = ||U1_i^T U2_j||_F^2
    i = numpy.arange(1, overlap.shape[0] + 1)[:, None]
    j = numpy.arange(1, overlap.shape[1] + 1)[None, :]
    return numpy.clip(squared_norms / numpy.minimum(i, j), 0.0, 1.0)   # clip: rounding only


def phi_matrix(A1, A2) -> numpy.ndarray:
    """phi(A1, A2, i, j) for every i = 1..r1, j = 1..r2, as an (r1, r2) array (entry [i-1, j-1]).

    A1: (r1, in), A2: (r2, in), the same input dimension.
    """
    return phi_of_bases(subspace_basis(A1), subspace_basis(A2))


def phi(A1, A2, i: int, j: int) -> float:
    """phi(A1, A2, i, j) = ||U1_i^T U2_j||_F^2 / min(i, j) with U the right singular vectors of A (r, in)."""
    r1, r2 = numpy.shape(A1)[0], numpy.shape(A2)[0]
    if not (1 <= i <= r1 and 1 <= j <= r2):
        raise ValueError(f"need 1 <= i <= {r1} and 1 <= j <= {r2}; got i = {i}, j = {j}")
    return float(phi_matrix(A1, A2)[i - 1, j - 1])


def random_expectation(r1: int, r2: int, d: int) -> numpy.ndarray:
    """E phi for uniformly random subspaces of R^d: max(i, j) / d as an (r1, r2) array (see the module docstring)."""
    i = numpy.arange(1, r1 + 1)[:, None]
    j = numpy.arange(1, r2 + 1)[None, :]
    return numpy.maximum(i, j) / d


def spectral_gap(M, r: int | None = None) -> float:
    """s1 / s2 of M's singular values (of its top r when given): how far its top direction stands apart."""
    s = numpy.linalg.svd(numpy.asarray(M, dtype=numpy.float64), compute_uv=False)
    s = s[:r] if r is not None else s
    if s.size < 2 or s[1] <= 0:
        raise ValueError(f"a spectral gap needs two non-zero singular values; got {s[:2].tolist()}")
    return float(s[0] / s[1])


def stats(m) -> dict:
    """The numbers reported from a phi heatmap m (r1, r2), r1 <= r2: phi(1, 1), phi(1, r2), phi(r1, r1),
    phi(r1, r2) and the heatmap's mean."""
    r1 = m.shape[0]
    return {"top1": float(m[0, 0]), "top1_in_all": float(m[0, -1]), "square": float(m[r1 - 1, r1 - 1]),
            "all": float(m[-1, -1]), "mean": float(m.mean())}


def random_baseline(r1: int, r2: int, d: int, modules: int, draws: int, rng) -> dict:
    """Chance measured the way the trained numbers are: each draw is the mean over ``modules`` pairs of
    independent Gaussian A1 (r1, d) and A2 (r2, d) of every stat of phi_matrix(A1, A2), of the spectral gaps
    of A1 and A2, and of the spectral gaps of products of Gaussian factors (d, r) (r, d) at r = r1 and r2.

    Returns {name: [value per draw]} for the stats and for "gap A r=R", "gap dW r=R"."""
    with blas_threads(1):       # small matrices: BLAS threads only wait on each other, badly on a busy machine
        return _random_draws(r1, r2, d, modules, draws, rng)


def _random_draws(r1: int, r2: int, d: int, modules: int, draws: int, rng) -> dict:
    out = {}
    for _ in range(draws):
        per_module = []
        for _ in range(modules):
            bases, row = [], {}
            for r in (r1, r2):
                _, s, Vt = numpy.linalg.svd(rng.standard_normal((r, d)), full_matrices=False)
                bases.append(Vt.T)
                row[f"gap A r={r}"] = float(s[0] / s[1])
                row[f"gap dW r={r}"] = spectral_gap(_product_core(rng.standard_normal((d, r)),
                                                                  rng.standard_normal((r, d))))
            row.update(stats(phi_of_bases(*bases)))
            per_module.append(row)
        for key in per_module[0]:
            out.setdefault(key, []).append(float(numpy.mean([row[key] for row in per_module])))
    return out


def random_spectra(ranks, d: int, draws: int, rng) -> dict:
    """{"A r=R", "dW r=R": mean over draws of the singular values / the largest} of Gaussian (R, d) matrices and
    of products of Gaussian factors (d, R) (R, d): the spectra a trained A or Delta W is read against."""
    out = {}
    with blas_threads(1):
        for r in ranks:
            for kind, draw in (("A", lambda: rng.standard_normal((r, d))),
                               ("dW", lambda: _product_core(rng.standard_normal((d, r)), rng.standard_normal((r, d))))):
                spectra = [numpy.linalg.svd(draw(), compute_uv=False) for _ in range(draws)]
                out[f"{kind} r={r}"] = numpy.mean([sv / sv[0] for sv in spectra], axis=0).tolist()
    return out


def _product_core(F, G) -> numpy.ndarray:
    """An (r, r) matrix with the singular values of F G, F (d, r), G (r, d): F = Q1 R1, G^T = Q2 R2, so
    F G = Q1 (R1 R2^T) Q2^T and the orthonormal Q's leave the singular values alone (cheaper than F G's SVD)."""
    return numpy.linalg.qr(F)[1] @ numpy.linalg.qr(G.T)[1].T


# ----------------------------------------------------------------------------------------------------
# the study


@dataclass
class SubspaceResult:
    """What run() measured; intervals are protocol.Interval dicts (the trained ones over the pairs of runs,
    the random ones over the draws).

    tuned: {"r=8", "r=64": common.tuned_lora's dict (lr, dev scores, test loss)}.
    pairs: [[seed of the r_small run, seed of the r_large run], ...].
    phi: {state: {stat: Interval}} for the states of STATES and the stats of STATS (means over modules).
    modules: {state: {module name: {stat: [value per pair]}}}.
    heatmaps: {state: the middle layer's q_proj heatmap, mean over the pairs, (r_small, r_large) lists}.
    random: {stat or gap name: Interval over the draws}; random_range: {name: [2.5%, 97.5%] of single draws}.
    gaps: {"A r=R", "dW r=R": Interval over the reporting seeds of s1 / s2 (mean over modules)}.
    spectra: {"A r=R", "dW r=R": mean over seeds and modules of the singular values / the largest}; random_spectra:
      the same for random matrices of the shapes (random_spectra).
    top_direction_defined: {"A", "dW": whether the gap is above random at both ranks}.
    """

    d: int
    r_small: int
    r_large: int
    steps: int
    layer: int
    targets: list
    tuned: dict = field(default_factory=dict)
    pairs: list = field(default_factory=list)
    phi: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)
    heatmaps: dict = field(default_factory=dict)
    random: dict = field(default_factory=dict)
    random_range: dict = field(default_factory=dict)
    random_draws: int = 0
    random_spectra: dict = field(default_factory=dict)
    gaps: dict = field(default_factory=dict)
    spectra: dict = field(default_factory=dict)
    top_direction_defined: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)


def _initial_A(r: int, seed: int, names) -> dict:
    """{module name: A} at initialisation, exactly as run_lora(seed=seed) starts (apply_lora with that seed)."""
    model = load_pretrained(dropout=0.0)
    apply_lora(model, LoRAConfig(r=r, alpha=2.0 * r, targets=TARGETS), seed=seed)
    return {name: common.adapter_matrices(model, name)[0] for name in names}


def _module_names(n_layer: int) -> list:
    return [f"h.{i}.attn.{t}" for i in range(n_layer) for t in TARGETS]


def _matrices(model, r: int, seed: int, names) -> dict:
    """{module name: {"A", "A0", "in", "out", "sA", "sdW"}} of one trained model: A, its start, Delta W's
    top-r input and output bases, and the singular values of A and of Delta W's top r."""
    initial = _initial_A(r, seed, names)
    out = {}
    with blas_threads(1):
        for name in names:
            A, _, delta = common.adapter_matrices(model, name)           # delta: (in, out)
            U_in, V_out = update_bases(delta, r)
            out[name] = {"A": A, "A0": initial[name], "in": U_in, "out": V_out,
                         "sA": numpy.linalg.svd(A, compute_uv=False),
                         "sdW": numpy.linalg.svd(delta, compute_uv=False)[:r]}
    return out


def _heatmap(small: dict, large: dict, state: str) -> numpy.ndarray:
    if state == "A":
        return phi_matrix(small["A"], large["A"])
    if state == "A - A_init":
        return phi_matrix(small["A"] - small["A0"], large["A"] - large["A0"])
    return phi_of_bases(small[state.split()[1]], large[state.split()[1]])


def _compare_pairs(result: SubspaceResult, matrices: dict, names, middle: str) -> None:
    """Fill result.modules, .heatmaps and .phi: every state's phi heatmap for every pair and module."""
    for state in STATES:
        result.modules[state] = {name: {stat: [] for stat in (*STATS, "mean")} for name in names}
        maps = []
        for small_seed, large_seed in result.pairs:
            for name in names:
                small, large = matrices[result.r_small][small_seed], matrices[result.r_large][large_seed]
                m = _heatmap(small[name], large[name], state)
                for stat, value in stats(m).items():
                    result.modules[state][name][stat].append(value)
                if name == middle:
                    maps.append(m)
        result.heatmaps[state] = numpy.mean(maps, axis=0).tolist()
        result.phi[state] = {stat: asdict(protocol.interval(numpy.mean(
            [result.modules[state][name][stat] for name in names], axis=0))) for stat in (*STATS, "mean")}


def _check_ranks(ranks, d: int) -> tuple:
    """(r_small, r_large) from ``ranks``, or a ValueError: two distinct ranks, each with a spectral gap to
    measure (r >= 2) and a subspace of R^d (r <= d), smaller first."""
    ranks = tuple(ranks)
    if (len(ranks) != 2 or not all(isinstance(r, (int, numpy.integer)) for r in ranks)
            or not 2 <= ranks[0] < ranks[1] <= d):
        raise ValueError(f"ranks must be two integers 2 <= r_small < r_large <= {d}; got {ranks}")
    return int(ranks[0]), int(ranks[1])


def run(fast: bool = False, seed: int = 0, *, ranks=None, steps: int | None = None) -> SubspaceResult:
    """Tune and train r_small and r_large adapters under the protocol; compare their subspaces pair by pair.
    ``seed`` is accepted for the CLI; the protocol fixes the seeds, and ``seed`` seeds the random baseline.

    ranks: (r_small, r_large), default (R_SMALL, R_LARGE). steps: steps per run, default STEPS (FAST_STEPS
    when fast). Both make a smaller study under the same protocol (a notebook's); neither changes the default."""
    if steps is not None and (not isinstance(steps, (int, numpy.integer)) or steps < 1):
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    config = load_pretrained(dropout=0.0).config
    d = config.n_embd
    r_small, r_large = _check_ranks((R_SMALL, R_LARGE) if ranks is None else ranks, d)
    settings = common.RunSettings.for_mode(fast, steps=int(steps) if steps is not None
                                           else FAST_STEPS if fast else STEPS)
    seeds = protocol.report_seeds(fast)
    names = _module_names(config.n_layer)
    report = common.progress_counter(STUDY, fast, 2 * len(seeds))
    matrices, tunings = {}, {}
    result = SubspaceResult(d=d, r_small=r_small, r_large=r_large, steps=settings.steps, layer=config.n_layer // 2,
                            targets=list(TARGETS), settings=asdict(settings))
    for r in (r_small, r_large):
        trainable = common.attention_lora_parameters(r, TARGETS, config.n_layer, d)
        tuned = common.tuned_lora(f"r={r}", TARGETS, r, settings, fast, trainable, report=report, keep_models=True)
        models = tuned.pop("models")
        result.tuned[f"r={r}"] = tuned
        tunings[f"r={r}"] = protocol.Tuning(tuned["lr"], {float(k): v for k, v in tuned["dev_scores"].items()},
                                            tuned["interior"], True)
        matrices[r] = {s: _matrices(model, r, s, names) for s, model in zip(seeds, models)}
    result.pairs = [[seeds[k], seeds[(k + 1) % len(seeds)]] for k in range(len(seeds))]

    middle = f"h.{result.layer}.attn.q_proj"
    with blas_threads(1):
        _compare_pairs(result, matrices, names, middle)

    for r in (r_small, r_large):
        for kind, key in (("A", "sA"), ("dW", "sdW")):
            per_seed = [[m[key] for m in matrices[r][s].values()] for s in seeds]
            result.gaps[f"{kind} r={r}"] = asdict(protocol.interval(
                [numpy.mean([sv[0] / sv[1] for sv in spectra]) for spectra in per_seed]))
            result.spectra[f"{kind} r={r}"] = numpy.mean(
                [sv / sv[0] for spectra in per_seed for sv in spectra], axis=0).tolist()

    result.random_draws = FAST_RANDOM_DRAWS if fast else RANDOM_DRAWS
    draws = random_baseline(r_small, r_large, d, len(names), result.random_draws, numpy.random.default_rng(seed))
    result.random_spectra = random_spectra((r_small, r_large), d, result.random_draws,
                                           numpy.random.default_rng(seed + 1))
    for key, values in draws.items():
        result.random[key] = asdict(protocol.interval(values))
        result.random_range[key] = [float(v) for v in numpy.percentile(values, [2.5, 97.5])]
    for kind in ("A", "dW"):
        result.top_direction_defined[kind] = all(
            _against_random(result.gaps[f"{kind} r={r}"], result.random[f"gap {kind} r={r}"]) == "above random"
            for r in (r_small, r_large))
    result.protocol = protocol.protocol_record(
        common.split(), seeds, tunings, pairs=result.pairs, targets=list(TARGETS), random_draws=result.random_draws,
        pairing="r_small of reporting seed k against r_large of the next reporting seed; per pair the mean over "
                "the adapted modules; intervals over the pairs")
    result.findings = findings_of(result)
    return result


# ----------------------------------------------------------------------------------------------------
# report


def _against_random(ours, chance) -> str:
    """"above random", "below random" or "not distinguishable" from the two intervals."""
    text = protocol.verdict(ours, chance, "above", "below", lower_is_better=False)
    return {"above better": "above random", "below better": "below random"}.get(text, text)


def findings_of(result: SubspaceResult) -> list:
    """The claims this study tests (protocol.finding dicts), each verdict from the 95% intervals."""
    out = []
    pair = f"r={result.r_small} vs r={result.r_large}"
    for kind, what in (("A", "A"), ("dW", "Delta W")):
        parts = [f"r={r}: {_against_random(result.gaps[f'{kind} r={r}'], result.random[f'gap {kind} r={r}'])}"
                 for r in (result.r_small, result.r_large)]
        ours = "; ".join(f"r={r} {protocol.as_interval(result.gaps[f'{kind} r={r}']).text(3)} vs random "
                         f"{protocol.as_interval(result.random[f'gap {kind} r={r}']).text(3)}"
                         for r in (result.r_small, result.r_large))
        out.append(protocol.finding(
            STUDY, f"{what}'s top direction stands apart: spectral gap s1/s2 (mean over modules) against random "
                   f"matrices of the same shape",
            "implied by phi(1,1) > 0.5 (a top direction exists)", ours, "; ".join(parts)))
    top1 = protocol.as_interval(result.phi["A"]["top1"])
    chance = protocol.as_interval(result.random["top1"])
    out.append(protocol.finding(
        STUDY, f"top direction shared: phi(1,1) of trained A, {pair}, mean over modules, against random",
        f"> {PAPER_TOP1} (GPT-3, Fig. 3); chance 1/d", f"{top1.text(3)} vs random {chance.text(4)}",
        _against_random(top1, chance)))
    above = protocol.verdict_above(top1, PAPER_TOP1, lower_is_better=False)
    out.append(protocol.finding(
        STUDY, f"top direction shared: phi(1,1) of trained A, {pair}, against the paper's {PAPER_TOP1}",
        f"> {PAPER_TOP1} (GPT-3, Fig. 3)", top1.text(3),
        {"meets": f"above {PAPER_TOP1}", "misses": f"below {PAPER_TOP1}"}.get(above, above)))
    for state in ("dW in", "dW out"):
        ours = protocol.as_interval(result.phi[state]["top1"])
        out.append(protocol.finding(
            STUDY, f"top direction shared: phi(1,1) of {STATE_LABELS[state]}, {pair}, against random",
            "top singular direction shared (GPT-3)", f"{ours.text(3)} vs random {chance.text(4)}",
            _against_random(ours, chance)))
    # A's and Delta W's input subspaces are the same (Delta W = s A^T B^T): one finding covers both
    for state in ("A", "dW out"):
        whole = protocol.as_interval(result.phi[state]["all"])
        out.append(protocol.finding(
            STUDY, f"whole subspaces: phi({result.r_small},{result.r_large}) of {STATE_LABELS[state]} against "
                   f"random", f"chance {result.r_large}/d", f"{whole.text(3)} vs random "
                                                           f"{protocol.as_interval(result.random['all']).text(3)}",
            _against_random(whole, result.random["all"])))
    return out


def summary(result: SubspaceResult) -> str:
    """The protocol line, phi per state beside random, the spectral gaps, the findings."""
    lrs = ", ".join(f"{k}: lr {v['lr']:g}{'' if v['interior'] else ' (edge)'}, test loss "
                    f"{protocol.as_interval(v['test']).text()}" for k, v in result.tuned.items())
    lines = [f"Subspace similarity phi (paper 7.2): r={result.r_small} vs r={result.r_large}, LoRA on "
             f"{', '.join(result.targets)}, d={result.d}, {result.steps} steps",
             f"protocol: lr chosen on dev (seed {result.protocol.get('selection_seed', 0)}), matrices from the test "
             f"runs of seeds {result.protocol.get('report_seeds', [])}; pairs (r={result.r_small} seed, "
             f"r={result.r_large} seed) {result.pairs}; mean over modules per pair, 95% CI over pairs",
             f"tuned: {lrs}", "",
             f"{'':28s}" + "".join(f"{STAT_LABELS[s]:>24s}" for s in STATS)]
    for state in STATES:
        lines.append(f"{STATE_LABELS[state]:28s}" + "".join(
            f"{protocol.as_interval(result.phi[state][s]).text(3):>24s}" for s in STATS))
    lines.append(f"{'random (' + str(result.random_draws) + ' draws)':28s}" + "".join(
        f"{protocol.as_interval(result.random[s]).text(3):>24s}" for s in STATS))
    lines.append(f"{'random, 95% of single draws':28s}" + "".join(
        f"{'[' + ', '.join(f'{v:.3f}' for v in result.random_range[s]) + ']':>24s}" for s in STATS))
    lines += ["", "spectral gap s1/s2 (mean over modules; 95% CI over seeds) against random matrices of the shape:"]
    for key, gap in result.gaps.items():
        lines.append(f"  {key:9s} {protocol.as_interval(gap).text(3)}   random "
                     f"{protocol.as_interval(result.random['gap ' + key]).text(3)}")
    lines.append("top direction defined (gap above random at both ranks): " + ", ".join(
        f"{k} {'yes' if v else 'no: phi(1,1) of ' + k + ' is noise; read phi(r1,r2)'}"
        for k, v in result.top_direction_defined.items()))
    lines += ["", "phi(1,1) per module (trained A | Delta W input), mean [95% CI] over pairs:"]
    for name in result.modules["A"]:
        cells = []
        for state in ("A", "dW in"):
            values = result.modules[state][name]["top1"]
            cells.append(protocol.interval(values).text(3))
        lines.append(f"  {name:16s} {cells[0]:>24s} | {cells[1]:>24s}")
    lines += ["", "findings:"]
    lines += [f"  - {f['claim']}: ours {f['ours']}; paper {f['paper']} -> {f['verdict']}" for f in result.findings]
    return "\n".join(lines)


def plot(result: SubspaceResult, path) -> None:
    """Heatmaps of phi for the middle layer's Wq (trained A, Delta W's input directions; mean over pairs) beside
    chance max(i, j) / d; phi(1, 1) and phi(r1, r2) per state with 95% intervals beside the random baseline's;
    the singular value spectra of A and Delta W beside random ones."""
    from ..plots import new_figure, save_figure

    fig, axes = new_figure(2, 3, figsize=(17, 10))
    L = result.layer
    for ax, state in zip(axes[0, :2], ("A", "dW in")):
        _heatmap_panel(ax, numpy.asarray(result.heatmaps[state]),
                       f"{STATE_LABELS[state]}: Wq layer {L}, r={result.r_small} vs r={result.r_large}, "
                       f"mean over {len(result.pairs)} pairs")
    image = _heatmap_panel(axes[0, 2], random_expectation(result.r_small, result.r_large, result.d),
                           f"chance: max(i, j) / d, d = {result.d}")
    fig.colorbar(image, ax=axes[0, 2], label="phi (every heatmap: same 0..1 scale)")
    x = numpy.arange(len(STATES))
    for ax, stat in zip(axes[1, :2], ("top1", "all")):
        values = [protocol.as_interval(result.phi[state][stat]) for state in STATES]
        mean = numpy.array([v.mean for v in values])
        ax.bar(x, mean, yerr=[mean - [v.low for v in values], [v.high for v in values] - mean], capsize=4,
               color="tab:blue", label="trained (mean over modules, 95% CI over pairs)")
        chance = protocol.as_interval(result.random[stat])
        ax.axhspan(*result.random_range[stat], color="grey", alpha=0.2, label="random: 95% of single draws")
        ax.axhline(chance.mean, color="k", linestyle="--", label="random: mean")
        if stat == "top1":
            ax.axhline(PAPER_TOP1, color="tab:red", linestyle=":", label="paper: > 0.5")
        ax.set_xticks(x, [STATE_LABELS[s] for s in STATES], rotation=15)
        label = STAT_LABELS[stat].replace("r1", str(result.r_small)).replace("r2", str(result.r_large))
        ax.set(ylim=(0, 1), ylabel=label, title=f"{STAT_LABELS[stat]} by what is compared")
        ax.legend(fontsize=8)
    ax = axes[1, 2]
    for colour, (key, spectrum) in enumerate(result.spectra.items()):
        ax.plot(numpy.arange(1, len(spectrum) + 1), spectrum, marker="o", markersize=2.5, color=f"C{colour}",
                label=f"trained {key}")
        chance = result.random_spectra[key]
        ax.plot(numpy.arange(1, len(chance) + 1), chance, linestyle=":", color=f"C{colour}", label=f"random {key}")
    ax.set(xscale="log", xlabel="index i", ylabel="s_i / s_1 (mean over seeds and modules)",
           title="singular value spectra (flat: no distinct top direction)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _heatmap_panel(ax, m, title):
    image = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", origin="upper",
                      extent=(0.5, m.shape[1] + 0.5, m.shape[0] + 0.5, 0.5))
    ax.set_xlabel("j")
    ax.set_ylabel("i")
    ax.set_title(title, fontsize=9)
    return image
