"""Statistics for the report (pure functions: numpy and scipy, no Ray, no torch).

- bootstrap confidence intervals of a mean over seeds, and of a difference of two means
  (independent samples), with scipy.stats.bootstrap: BCa, or percentile where BCa degenerates;
- Welch's t-test, Holm's step-down correction (and Benjamini-Hochberg through
  scipy.stats.false_discovery_control) over a family of comparisons;
- savings at equal accuracy: the pre-training compute at which a ladder of PT+FT budgets reaches a
  target score (isotonic fit of score against log10 compute, piecewise-linear between the ladder's
  points), with a bootstrap over seeds for its uncertainty.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 2000


def _clean(x) -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    return a[~np.isnan(a)]


def _bootstrap(data: tuple, statistic, confidence: float, n_resamples: int, seed: int) -> tuple[float, float, str]:
    """scipy.stats.bootstrap, BCa first; percentile where BCa cannot be computed (degenerate data)."""
    from scipy import stats

    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                res = stats.bootstrap(
                    data,
                    statistic,
                    n_resamples=n_resamples,
                    confidence_level=confidence,
                    method=method,
                    vectorized=True,
                    rng=np.random.default_rng(seed),
                )
            except (ValueError, FloatingPointError):
                continue
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(lo) or math.isnan(hi)):
            return lo, hi, method
    return float("nan"), float("nan"), ""


def mean_ci(x, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """Mean over seeds with its bootstrap CI. One value: no interval (NaN). All values equal: the
    interval is that value (a bootstrap cannot see any spread)."""
    a = _clean(x)
    out = {
        "n": int(a.size),
        "mean": float(a.mean()) if a.size else float("nan"),
        "lo": float("nan"),
        "hi": float("nan"),
        "ci_method": "",
    }
    if a.size < 2:
        return out
    if np.all(a == a[0]):
        out.update(lo=float(a[0]), hi=float(a[0]), ci_method="degenerate")
        return out
    lo, hi, m = _bootstrap((a,), lambda s, axis: np.mean(s, axis=axis), confidence, n_resamples, seed)
    out.update(lo=lo, hi=hi, ci_method=m)
    return out


def diff_ci(a, b, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """mean(a) - mean(b) with an independent two-sample bootstrap CI (each sample resampled on its own)."""
    a, b = _clean(a), _clean(b)
    out = {
        "diff": float(a.mean() - b.mean()) if a.size and b.size else float("nan"),
        "lo": float("nan"),
        "hi": float("nan"),
        "ci_method": "",
    }
    if a.size < 2 or b.size < 2:
        return out
    if np.all(a == a[0]) and np.all(b == b[0]):
        out.update(lo=out["diff"], hi=out["diff"], ci_method="degenerate")
        return out
    lo, hi, m = _bootstrap(
        (a, b), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis), confidence, n_resamples, seed
    )
    out.update(lo=lo, hi=hi, ci_method=m)
    return out


def welch_p(a, b) -> float:
    """Two-sided Welch t-test p-value; NaN when it is undefined (fewer than 2 values a side, or no
    spread on either side)."""
    from scipy import stats

    a, b = _clean(a), _clean(b)
    if a.size < 2 or b.size < 2:
        return float("nan")
    if a.var() == 0 and b.var() == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error). NaN entries are left out of the family
    and stay NaN. Adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)), p sorted ascending."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return out


def bh(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate) via scipy.stats.false_discovery_control;
    NaN entries are left out and stay NaN."""
    from scipy import stats

    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


# --------------------------------------------------------------------------- savings at equal accuracy
FIT = (
    "isotonic (least-squares non-decreasing) fit of mean test score against log10 pre-training compute "
    "over the ladder's budgets, piecewise-linear in log10 compute between them"
)


def isotonic(y, w=None) -> np.ndarray:
    """Least-squares non-decreasing fit of y (in the given order), weighted by w (pool adjacent violators)."""
    from scipy.optimize import isotonic_regression

    y = np.asarray(y, dtype=float)
    if y.size < 2:
        return y.copy()
    return np.asarray(isotonic_regression(y, weights=None if w is None else np.asarray(w, float)).x)


def crossing(compute, scores, target: float, weights=None) -> tuple[float, str]:
    """The compute at which the ladder (compute_i, score_i) reaches `target`, after an isotonic fit of
    score against log10 compute and linear interpolation in log10 compute between the ladder's points.

    Returns (compute, kind): kind "crossing" (the compute where the fit equals target), "always" (the
    fit at the smallest compute already reaches target: compute = that smallest compute, an upper
    bound) or "never" (the fit at the largest compute stays below target: compute = that largest
    compute, a lower bound)."""
    c = np.asarray(compute, dtype=float)
    s = np.asarray(scores, dtype=float)
    if c.size == 0 or np.any(c <= 0) or np.isnan(target):
        return float("nan"), "undefined"
    order = np.argsort(c, kind="stable")
    c, s = c[order], s[order]
    w = None if weights is None else np.asarray(weights, float)[order]
    # equal compute twice (two budgets priced alike): one point, their weighted mean score
    uc, inv = np.unique(c, return_inverse=True)
    ux = np.log10(uc)
    ww = np.ones_like(s) if w is None else w
    us = np.bincount(inv, weights=s * ww) / np.bincount(inv, weights=ww)
    uw = np.bincount(inv, weights=ww)
    fit = isotonic(us, uw)
    if fit[0] >= target:
        return float(uc[0]), "always"
    if fit[-1] < target:
        return float(uc[-1]), "never"
    i = int(np.flatnonzero(fit >= target)[0])  # fit[i-1] < target <= fit[i], fit[i] > fit[i-1]
    t = (target - fit[i - 1]) / (fit[i] - fit[i - 1])
    return float(10 ** (ux[i - 1] + t * (ux[i] - ux[i - 1]))), "crossing"


def _crossings_log10(compute: np.ndarray, means: np.ndarray, targets: np.ndarray, weights) -> np.ndarray:
    """crossing() for many resamples at once (rows of `means`, entries of `targets`), as log10 compute:
    +inf where the ladder never reaches the target, -inf where its smallest budget already does.
    Rows already non-decreasing are interpolated in one vectorized pass; the others go through
    crossing() (its isotonic fit) one by one."""
    out = np.empty(len(targets))
    mono = np.all(np.diff(means, axis=1) >= 0, axis=1) if means.shape[1] > 1 else np.ones(len(targets), bool)
    uniq = np.unique(compute).size == compute.size
    x = np.log10(compute)
    for k in np.flatnonzero(~mono | (not uniq)):
        v, kind = crossing(compute, means[k], targets[k], weights)
        out[k] = math.inf if kind == "never" else -math.inf if kind == "always" else math.log10(v)
    if not uniq:
        return out
    idx = np.flatnonzero(mono)
    m, t = means[idx], targets[idx]
    always, never = m[:, 0] >= t, m[:, -1] < t
    mid = ~always & ~never
    res = np.where(always, -math.inf, math.inf)
    if mid.any():
        mm, tt = m[mid], t[mid]
        i = np.argmax(mm >= tt[:, None], axis=1)  # first budget reaching the target (i >= 1 here)
        r = np.arange(len(i))
        lo, hi = mm[r, i - 1], mm[r, i]
        frac = (tt - lo) / (hi - lo)
        res[mid] = x[i - 1] + frac * (x[i] - x[i - 1])
    out[idx] = res
    return out


@dataclass
class EqualAccuracy:
    target: float  # the method's mean test score
    own_compute: float  # the method's own pre-training compute for this cell
    compute: float  # PT+FT's compute at equal accuracy (a bound where kind is "always"/"never")
    kind: str  # crossing / always / never / undefined
    lo: float = float("nan")  # percentile interval of the crossing over seed resamples; -inf/inf: off the ladder
    hi: float = float("nan")
    frac_never: float = 0.0  # share of resamples where PT+FT never reaches the target within the ladder
    frac_always: float = 0.0  # share where it reaches it at the smallest budget
    ladder: list = field(default_factory=list)  # [(compute, mean score, n)] in compute order

    @property
    def saved(self) -> float:
        return self.compute - self.own_compute

    @property
    def ratio(self) -> float:
        return self.compute / self.own_compute if self.own_compute > 0 else float("nan")


def equal_accuracy(
    ladder,
    target_scores,
    own_compute: float,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> EqualAccuracy:
    """PT+FT's pre-training compute at the method's mean test score.

    ladder: [(compute, scores over seeds), ...], one entry per PT+FT budget; target_scores: the
    method's scores over seeds. The uncertainty resamples each arm's seeds with replacement (the
    ladder's budgets and the method independently), recomputes the means and the crossing, and takes
    the percentile interval; a resample off the ladder counts as +inf (never reaches) or -inf
    (reaches at the smallest budget), so an interval bound off the ladder is reported as such."""
    lad = [(float(c), _clean(s)) for c, s in ladder]
    lad = [(c, s) for c, s in lad if s.size and c > 0 and not math.isnan(c)]
    tgt = _clean(target_scores)
    pts = [(c, float(s.mean()), int(s.size)) for c, s in sorted(lad, key=lambda t: t[0])]
    if not lad or not tgt.size:
        return EqualAccuracy(
            float(tgt.mean()) if tgt.size else float("nan"), float(own_compute), float("nan"), "undefined", ladder=pts
        )
    comp = [p[0] for p in pts]
    means = [p[1] for p in pts]
    ns = [p[2] for p in pts]
    target = float(tgt.mean())
    c0, kind = crossing(comp, means, target, ns)
    rng = np.random.default_rng(seed)
    srt = sorted(lad, key=lambda t: t[0])
    # resampled means: one column per ladder budget, one row per resample; the target beside them
    means_b = np.stack([s[rng.integers(0, s.size, (n_resamples, s.size))].mean(axis=1) for _, s in srt], axis=1)
    tgt_b = tgt[rng.integers(0, tgt.size, (n_resamples, tgt.size))].mean(axis=1)
    boots = _crossings_log10(np.asarray(comp), means_b, tgt_b, ns)
    a = (1 - confidence) / 2
    lo, hi = np.quantile(boots, [a, 1 - a], method="inverted_cdf")
    conv = lambda v: float(v) if math.isinf(v) else float(10**v)  # noqa: E731
    return EqualAccuracy(
        target,
        float(own_compute),
        c0,
        kind,
        conv(lo),
        conv(hi),
        float(np.mean(np.isposinf(boots))),
        float(np.mean(np.isneginf(boots))),
        pts,
    )
