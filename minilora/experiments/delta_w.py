"""How the LoRA update Delta W relates to the pretrained W (LoRA paper, section 7.3, Table 7).

The question: does the update repeat what W already does (its top singular directions), point somewhere
random, or amplify directions that W has but does not emphasise?

The measure. Project W onto an r-dimensional pair of subspaces and take the Frobenius norm:

    projection_norm(W, U, V) = ||U^T W V||_F          W: (m, n); U: (m, r), V: (n, r), orthonormal columns.

Layout. minilora stores a linear layer's W as (in, out) (y = x W), so here U spans directions of the input
space R^in and V of the output space R^out, and Delta W = s A^T B^T (in, out) is in the same layout. The paper
writes W as (d, k) acting as h = W x (W is (out, in)) and computes U^T W V^T with U (d, r) and V^T (r, k); it is
the same number: both are the norm of W restricted to the same input and output subspaces, our
||U_in^T W_(in,out) V_out||_F = ||V_out^T W_(out,in) U_in||_F. What matters is that U, V are the left and right
singular vectors of a matrix in W's own layout.

Three choices of U, V, each of rank r:
  - Delta W's top-r singular vectors (Delta W from a rank-r adapter has rank r, so these are all of it),
  - W's own top-r singular vectors: then ||U^T W V||_F = sqrt(sigma_1^2 + ... + sigma_r^2), the largest value
    any orthonormal rank-r U, V can give (the singular values of U^T W V are at most W's, one by one),
  - random orthonormal U, V: E ||U^T W V||_F^2 = trace(W^T E[P_U] W E[P_V]) = (r / m)(r / n) ||W||_F^2, since
    the projector onto a uniformly random r-dimensional subspace of R^m has mean (r / m) I. The study also
    measures it: RANDOM_DRAWS Haar-random pairs per module and rank, with the 95% interval of their mean.

The amplification factor ||Delta W||_F / ||U^T W V||_F (U, V from Delta W) says how much the update
magnifies the part of W that lies in its own directions.

The paper (GPT-3, layer 48 Wq): at r = 4, ||U^T W V||_F is 0.32 for Delta W's directions, 21.67 for W's and
0.02 for random (||W||_F = 61.95, ||Delta W||_F = 6.91): Delta W correlates with W more than chance but mostly
amplifies directions W does not emphasise, by a factor of about 6.91 / 0.32 ~ 21.5; at r = 64 the factor is
about 2. The paper keeps alpha fixed, so its scale alpha / r (and ||Delta W||) shrinks as r grows; here
run_lora keeps alpha = 2 r (scale 2 at every rank), so any shrinking of the factor with r comes from the
denominator, the larger subspace taking in more of W.

The protocol. LoRA on {Wq, Wv} of every layer, python-email's declared split (common.split), STEPS steps, at
each r in RANKS. Each rank's learning rate is tuned on dev with the selection seed (common.tuned_lora); the
reporting seeds' runs (on test) give the updates. W is frozen, so W's own directions and the random baseline
are the same for every seed; Delta W's numbers get a 95% interval over the reporting seeds: for the middle
layer's Wq (the paper shows layer 48 of 96) and, per seed, the geometric mean over all adapted modules of the
amplification factor, of Delta W's directions against random, and of W's directions against Delta W's.
Verdicts come from those intervals: against the random baseline's interval, against W's top directions,
against 1 (for ratios), and between the smallest paper rank and the largest rank for the amplification.
Unlike the paper's update, these runs move W far (a 128-wide model, hundreds of AdamW steps at scale 2), so
||Delta W||_F need not be small beside ||W||_F.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy

from ..fast.parallel import blas_threads
from ..io.pretrained import load_pretrained
from . import common, protocol

STUDY = "delta-w"
TARGETS = ("q_proj", "v_proj")
RANKS = (1, 4, 16, 64)
FAST_RANKS = (4, 16)
STEPS = 200
FAST_STEPS = 10
RANDOM_DRAWS, FAST_RANDOM_DRAWS = 200, 20     # random U, V pairs per rank and module
PAPER = {"r": 4, "delta_dirs": 0.32, "w_dirs": 21.67, "random": 0.02, "w_norm": 61.95, "delta_norm": 6.91,
         "amplification": 21.5, "large_r": 64, "large_r_amplification": "about 2"}

# ----------------------------------------------------------------------------------------------------
# the measure


def projection_norm(W, U, V) -> float:
    """||U^T W V||_F: the size of W between the subspaces spanned by U's and V's columns.

    W: (m, n); U: (m, r); V: (n, r), orthonormal columns. Returns a float.
    """
    W, U, V = (numpy.asarray(x, dtype=numpy.float64) for x in (W, U, V))
    if W.ndim != 2 or U.ndim != 2 or V.ndim != 2 or U.shape[0] != W.shape[0] or V.shape[0] != W.shape[1]:
        raise ValueError(f"need W (m, n), U (m, r), V (n, r); got W {W.shape}, U {U.shape}, V {V.shape}")
    return float(numpy.linalg.norm(U.T @ W @ V))             # (r, m) (m, n) (n, r) -> (r, r)


def top_singular_vectors(M, r: int):
    """The top-r left and right singular vectors of M (m, n): U (m, r), V (n, r), with M ~ U diag(S) V^T."""
    M = numpy.asarray(M, dtype=numpy.float64)
    if not 1 <= r <= min(M.shape):
        raise ValueError(f"need 1 <= r <= {min(M.shape)} for a {M.shape} matrix; got r = {r}")
    U, _, Vt = numpy.linalg.svd(M, full_matrices=False)
    return U[:, :r], Vt[:r].T


def random_orthonormal(n: int, r: int, rng) -> numpy.ndarray:
    """A uniformly random (Haar) n x r matrix with orthonormal columns: QR of a Gaussian, signs fixed."""
    Q, R = numpy.linalg.qr(rng.standard_normal((n, r)))
    return Q * numpy.sign(numpy.diag(R))[None, :]            # the sign fix makes Q exactly Haar-distributed


def random_projection_expectation(W, r: int) -> float:
    """sqrt(E ||U^T W V||_F^2) for random orthonormal U (m, r), V (n, r): r ||W||_F / sqrt(m n)."""
    m, n = numpy.shape(W)
    return float(r * numpy.linalg.norm(W) / numpy.sqrt(m * n))


def random_projections(W, r: int, rng, draws: int) -> list:
    """||U^T W V||_F for ``draws`` independent Haar-random pairs U (m, r), V (n, r)."""
    m, n = numpy.shape(W)
    return [projection_norm(W, random_orthonormal(m, r, rng), random_orthonormal(n, r, rng)) for _ in range(draws)]


def update_numbers(W, delta, r: int) -> dict:
    """The Table 7 numbers of one update delta (m, n) of W (m, n) at rank r, random directions aside:
    {"delta_dirs", "w_dirs", "w_norm", "delta_norm", "amplification" = ||Delta W||_F / delta_dirs}."""
    delta_dirs = projection_norm(W, *top_singular_vectors(delta, r))
    delta_norm = float(numpy.linalg.norm(delta))
    return {"delta_dirs": delta_dirs, "w_dirs": projection_norm(W, *top_singular_vectors(W, r)),
            "w_norm": float(numpy.linalg.norm(W)), "delta_norm": delta_norm, "amplification": delta_norm / delta_dirs}


def compare(W, delta, r: int, rng, draws: int = RANDOM_DRAWS) -> dict:
    """The Table 7 numbers for one W (m, n) and its update delta (m, n) at rank r: update_numbers' and
    "random" (mean over ``draws`` random pairs) and "random_expected"."""
    return {**update_numbers(W, delta, r), "random": float(numpy.mean(random_projections(W, r, rng, draws))),
            "random_expected": random_projection_expectation(W, r)}


# ----------------------------------------------------------------------------------------------------
# the study

PER_SEED = ("delta_dirs", "delta_norm", "amplification")
GEOMEANS = ("amplification", "delta_over_random", "w_over_delta")
GEOMEAN_LABELS = {"amplification": "amplification factor", "delta_over_random": "Delta W dirs / random",
                  "w_over_delta": "W dirs / Delta W dirs"}


@dataclass
class DeltaWResult:
    """What run() measured; intervals are protocol.Interval dicts, each list follows ``ranks``.

    tuned: {"r=R": common.tuned_lora's dict (lr, dev scores, test loss)}.
    modules: {module name: {"w_norm": float, "w_dirs": [per rank], "random": [Interval over the draws],
      "random_expected": [per rank], and "delta_dirs", "delta_norm", "amplification": [[per seed] per rank]}}.
    middle: {"delta_dirs", "delta_norm", "amplification": [Interval over seeds]} for the middle layer's Wq.
    geomean: {"amplification", "delta_over_random", "w_over_delta": [Interval over seeds]} of the geometric
      mean over all adapted modules.
    """

    ranks: list
    steps: int
    layer: int
    shape: list                     # W's (in, out)
    targets: list
    random_draws: int = 0
    tuned: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)
    middle: dict = field(default_factory=dict)
    geomean: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)


def _names(n_layer: int) -> list:
    return [f"h.{i}.attn.{t}" for i in range(n_layer) for t in TARGETS]


def middle_module(result: DeltaWResult) -> str:
    """The module the paper's table corresponds to: Wq of the middle layer."""
    return f"h.{result.layer}.attn.q_proj"


def _check_ranks(ranks, limit: int) -> tuple:
    """``ranks`` as a tuple of ints, or a ValueError: at least one, increasing, each 1 <= r <= limit (W's
    smaller side)."""
    ranks = tuple(ranks)
    if (not ranks or not all(isinstance(r, (int, numpy.integer)) for r in ranks)
            or not 1 <= ranks[0] or ranks[-1] > limit or any(a >= b for a, b in zip(ranks, ranks[1:]))):
        raise ValueError(f"ranks must be increasing integers between 1 and {limit}; got {ranks}")
    return tuple(int(r) for r in ranks)


def run(fast: bool = False, seed: int = 0, *, ranks=None, steps: int | None = None) -> DeltaWResult:
    """Every rank under the protocol; the Table 7 numbers for every adapted module of every reporting run.
    ``seed`` is accepted for the CLI; the protocol fixes the training seeds, and ``seed`` seeds the random
    directions.

    ranks: increasing ranks, default RANKS (FAST_RANKS when fast). steps: steps per run, default STEPS
    (FAST_STEPS when fast). Both make a smaller study under the same protocol (a notebook's); neither changes
    the default."""
    if steps is not None and (not isinstance(steps, (int, numpy.integer)) or steps < 1):
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    base = load_pretrained(dropout=0.0)
    ranks = _check_ranks((FAST_RANKS if fast else RANKS) if ranks is None else ranks, base.config.n_embd)
    settings = common.RunSettings.for_mode(fast, steps=int(steps) if steps is not None
                                           else FAST_STEPS if fast else STEPS)
    seeds = protocol.report_seeds(fast)
    names = _names(base.config.n_layer)
    weights = {name: common.weight(base, name + ".weight") for name in names}     # frozen: the same in every run
    rng = numpy.random.default_rng(seed)
    report = common.progress_counter(STUDY, fast, len(ranks) * len(seeds))
    result = DeltaWResult(ranks=list(ranks), steps=settings.steps, layer=base.config.n_layer // 2,
                          shape=list(weights[names[0]].shape), targets=list(TARGETS),
                          random_draws=FAST_RANDOM_DRAWS if fast else RANDOM_DRAWS, settings=asdict(settings))
    result.modules = {name: {"w_norm": float(numpy.linalg.norm(weights[name])), "w_dirs": [], "random": [],
                             "random_expected": [], **{key: [] for key in PER_SEED}} for name in names}
    tunings = {}
    for r in ranks:
        trainable = common.attention_lora_parameters(r, TARGETS, base.config.n_layer, base.config.n_embd)
        tuned = common.tuned_lora(f"r={r}", TARGETS, r, settings, fast, trainable, report=report, keep_models=True)
        models = tuned.pop("models")
        result.tuned[f"r={r}"] = tuned
        tunings[f"r={r}"] = protocol.Tuning(tuned["lr"], {float(k): v for k, v in tuned["dev_scores"].items()},
                                            tuned["interior"], True)
        with blas_threads(1):       # small matrices: BLAS threads only wait on each other on a busy machine
            for name in names:
                W, row = weights[name], result.modules[name]
                per_seed = []
                for model in models:
                    assert numpy.array_equal(common.weight(model, name + ".weight"), W), "W must stay frozen"
                    per_seed.append(update_numbers(W, common.adapter_matrices(model, name)[2], r))  # (in, out)
                for key in PER_SEED:
                    row[key].append([numbers[key] for numbers in per_seed])
                row["w_dirs"].append(per_seed[0]["w_dirs"])
                row["random"].append(asdict(protocol.interval(random_projections(W, r, rng, result.random_draws))))
                row["random_expected"].append(random_projection_expectation(W, r))

    middle = result.modules[middle_module(result)]
    result.middle = {key: [asdict(protocol.interval(values)) for values in middle[key]] for key in PER_SEED}
    result.geomean = {key: [] for key in GEOMEANS}
    for k in range(len(ranks)):
        for key in GEOMEANS:
            result.geomean[key].append(asdict(protocol.interval(
                [_geomean_of_seed(result, k, i, key) for i in range(len(seeds))])))
    result.protocol = protocol.protocol_record(
        common.split(), seeds, tunings, targets=list(TARGETS), random_draws=result.random_draws,
        reported="Delta W of each reporting run (test); W and the random baseline do not depend on the seed")
    result.findings = findings_of(result)
    return result


def _geomean_of_seed(result: DeltaWResult, k: int, i: int, key: str) -> float:
    """The geometric mean over modules of one ratio at rank index k, reporting seed index i."""
    def ratio(m):
        if key == "amplification":
            return m["amplification"][k][i]
        if key == "delta_over_random":
            return m["delta_dirs"][k][i] / protocol.as_interval(m["random"][k]).mean
        return m["w_dirs"][k] / m["delta_dirs"][k][i]
    return float(numpy.exp(numpy.mean([numpy.log(ratio(m)) for m in result.modules.values()])))


# ----------------------------------------------------------------------------------------------------
# report


def _phrase(text: str, words: dict) -> str:
    """A protocol verdict in the study's words ("meets" -> words["meets"], ...; "not distinguishable" stays)."""
    return words.get(text, text)


def findings_of(result: DeltaWResult) -> list:
    """The claims this study tests (protocol.finding dicts), each verdict from the 95% intervals."""
    ranks = result.ranks
    k = ranks.index(PAPER["r"]) if PAPER["r"] in ranks else 0
    r, large = ranks[k], ranks[-1]
    name = middle_module(result)
    m = result.modules[name]
    delta = protocol.as_interval(result.middle["delta_dirs"][k])
    chance = protocol.as_interval(m["random"][k])
    out = [protocol.finding(
        STUDY, f"r={r}, {name}: ||U^T W V||_F with Delta W's directions against random directions",
        f"{PAPER['delta_dirs']} vs {PAPER['random']} random (GPT-3 layer 48 Wq, r={PAPER['r']})",
        f"{delta.text(3)} vs random {chance.text(3)}",
        _phrase(protocol.verdict(delta, chance, "above", "below", lower_is_better=False),
                {"above better": "above random", "below better": "below random"}))]
    ratio = protocol.as_interval(result.geomean["delta_over_random"][k])
    out.append(protocol.finding(
        STUDY, f"r={r}, all adapted modules: Delta W's directions / random (geometric mean)",
        f"{PAPER['delta_dirs'] / PAPER['random']:.0f} (0.32 / 0.02)", ratio.text(3),
        _phrase(protocol.verdict_above(ratio, 1.0, lower_is_better=False), {"meets": "above 1", "misses": "below 1"})))
    out.append(protocol.finding(
        STUDY, f"r={r}, {name}: Delta W's directions against W's own top-{r} directions",
        f"{PAPER['delta_dirs']} vs {PAPER['w_dirs']} for W's own", f"{delta.text(3)} vs {m['w_dirs'][k]:.3f}",
        _phrase(protocol.verdict_above(delta, m["w_dirs"][k], lower_is_better=True),
                {"meets": "below W's top directions", "misses": "above W's top directions"})))
    for label, amp in ((name, result.middle["amplification"][k]),
                       ("all adapted modules (geometric mean)", result.geomean["amplification"][k])):
        amp = protocol.as_interval(amp)
        out.append(protocol.finding(
            STUDY, f"r={r}, {label}: amplification factor ||Delta W||_F / ||U^T W V||_F",
            f"{PAPER['amplification']} ({PAPER['delta_norm']} / {PAPER['delta_dirs']})", amp.text(2),
            _phrase(protocol.verdict_above(amp, 1.0, lower_is_better=False),
                    {"meets": "above 1 (amplifies)", "misses": "below 1"})))
    if large != r:
        small_amp, large_amp = (protocol.as_interval(result.geomean["amplification"][i]) for i in (k, -1))
        out.append(protocol.finding(
            STUDY, f"amplification factor (geometric mean over modules) falls with rank: r={r} against r={large}",
            f"{PAPER['amplification']} at r={PAPER['r']}, {PAPER['large_r_amplification']} at r={PAPER['large_r']}",
            f"r={r} {small_amp.text(2)} vs r={large} {large_amp.text(2)}",
            _phrase(protocol.verdict(small_amp, large_amp, f"r={r}", f"r={large}", lower_is_better=False),
                    {f"r={r} better": f"larger at r={r}", f"r={large} better": f"larger at r={large}"})))
    return out


def summary(result: DeltaWResult) -> str:
    """The protocol line, the Table 7 analogue for the middle layer's Wq, the geometric means over all modules,
    and the findings."""
    lrs = ", ".join(f"{k}: lr {v['lr']:g}{'' if v['interior'] else ' (edge)'}, test loss "
                    f"{protocol.as_interval(v['test']).text()}" for k, v in result.tuned.items())
    name = middle_module(result)
    m = result.modules[name]
    lines = [f"Delta W against W (paper 7.3, Table 7): LoRA on {', '.join(result.targets)}, W {tuple(result.shape)} "
             f"(in, out), {result.steps} steps",
             f"protocol: lr chosen on dev (seed {result.protocol.get('selection_seed', 0)}), Delta W from the test "
             f"runs of seeds {result.protocol.get('report_seeds', [])}; mean [95% CI] over seeds; random: "
             f"{result.random_draws} Haar-random U, V, mean [95% CI]",
             f"tuned: {lrs}", "",
             f"{name}   ||W||_F = {m['w_norm']:.2f}   (paper, GPT-3 layer 48 Wq, r={PAPER['r']}: Delta W dirs "
             f"{PAPER['delta_dirs']}, W dirs {PAPER['w_dirs']}, random {PAPER['random']}, ||W||_F {PAPER['w_norm']}, "
             f"||Delta W||_F {PAPER['delta_norm']}, amplification {PAPER['amplification']})",
             f"{'r':>4s} {'Delta W dirs':>24s} {'W dirs':>8s} {'random':>24s} {'(chance)':>9s} "
             f"{'||Delta W||_F':>24s} {'amplification':>24s}"]
    for k, r in enumerate(result.ranks):
        cell = lambda key, d=3: protocol.as_interval(result.middle[key][k]).text(d)
        lines.append(f"{r:4d} {cell('delta_dirs'):>24s} {m['w_dirs'][k]:8.3f} "
                     f"{protocol.as_interval(m['random'][k]).text(3):>24s} {m['random_expected'][k]:9.3f} "
                     f"{cell('delta_norm'):>24s} {cell('amplification', 2):>24s}")
    lines += ["", "over all adapted modules, geometric mean (95% CI over seeds):",
              f"{'r':>4s} " + " ".join(f"{GEOMEAN_LABELS[key]:>24s}" for key in GEOMEANS)]
    for k, r in enumerate(result.ranks):
        lines.append(f"{r:4d} " + " ".join(f"{protocol.as_interval(result.geomean[key][k]).text(2):>24s}"
                                           for key in GEOMEANS))
    lines += ["", "findings:"]
    lines += [f"  - {f['claim']}: ours {f['ours']}; paper {f['paper']} -> {f['verdict']}" for f in result.findings]
    return "\n".join(lines)


def _errorbar(ax, x, intervals, **kwargs):
    intervals = [protocol.as_interval(i) for i in intervals]
    mean = numpy.array([i.mean for i in intervals])
    ax.errorbar(x, mean, yerr=[mean - [i.low for i in intervals], [i.high for i in intervals] - mean], capsize=3,
                **kwargs)


def plot(result: DeltaWResult, path) -> None:
    """||U^T W V||_F against r for the three choices of U, V (middle layer's Wq and Wv; 95% intervals), and the
    amplification factor against r (geometric mean over modules and the middle Wq; 95% intervals) beside the
    paper's."""
    from matplotlib.ticker import NullLocator

    from ..plots import new_figure, save_figure

    fig, axes = new_figure(1, 3, figsize=(17, 5))
    r = result.ranks
    names = [n for n in result.modules if n.startswith(f"h.{result.layer}.")]
    for ax, name in zip(axes[:2], names):
        m = result.modules[name]
        ax.plot(r, m["w_dirs"], "o-", label="U, V of W (top r)")
        _errorbar(ax, r, [protocol.interval(v) for v in m["delta_dirs"]], fmt="o-", label="U, V of Delta W")
        _errorbar(ax, r, m["random"], fmt="o-", label="random U, V")
        ax.plot(r, m["random_expected"], "k:", label="chance: sqrt(E ||.||^2) = r ||W|| / sqrt(in out)")
        _errorbar(ax, r, [protocol.interval(v) for v in m["delta_norm"]], fmt="s--", color="gray",
                  label="||Delta W||_F")
        ax.axhline(m["w_norm"], color="k", linestyle="--", linewidth=0.8, label="||W||_F")
        ax.set(xscale="log", yscale="log", xlabel="rank r", ylabel="||U^T W V||_F (mean, 95% interval over seeds)",
               title=name)
        ax.set_xticks(r, [str(x) for x in r])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[2]
    _errorbar(ax, r, result.geomean["amplification"], fmt="o-", color="k", linewidth=2,
              label="geometric mean over modules")
    _errorbar(ax, r, result.middle["amplification"], fmt="o-", label=middle_module(result))
    ax.plot([PAPER["r"]], [PAPER["amplification"]], "r*", markersize=12, label="paper (GPT-3 layer 48 Wq)")
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set(xscale="log", yscale="log", xlabel="rank r",
           ylabel="||Delta W||_F / ||U^T W V||_F (mean, 95% interval over seeds)",
           title="amplification factor (U, V of Delta W)")
    ax.set_xticks(r, [str(x) for x in r])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.legend(fontsize=8)
    save_figure(fig, path)
