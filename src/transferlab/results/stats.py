"""The statistics behind every comparison: intervals, paired tests, Holm's correction, a power estimate.

Numbers in, numbers out (numpy and scipy only), so each function is checked against scipy and
statsmodels on fixed numbers (``tests/test_stats.py``; the multi-label metrics against scikit-learn in
``tests/test_multilabel_results.py``). The per-image metrics are numpy, not scikit-learn calls, because a
paired bootstrap recomputes them thousands of times. ``transferlab.results.compare`` decides which
test applies to which pair of experiments; ``docs/comparisons.md`` says what each one assumes.

* ``mean_interval`` — 95 % confidence interval of a mean over seeds / folds: Student's t below
  ``BOOTSTRAP_MIN_N`` values, the bootstrap percentile interval from there on; ``None`` for one value.
* ``paired_t`` — paired t-test over the seeds / folds two experiments share (the same seed or fold).
* ``welch_t`` — Welch's unpaired t-test, when both have several runs but none pair up.
* ``mcnemar`` — McNemar's test (exact binomial, mid-p) on the per-image correctness of two runs
  scored on the same test images: the test for two single runs.
* ``paired_bootstrap`` — the same situation for a metric that is not a per-image mean (balanced
  accuracy, macro F1, ECE; multi-label mAP, F1, Hamming loss): test images resampled together,
  difference interval and p-value.
* ``holm`` — Holm's step-down adjustment of the p-values of one family of comparisons.
* ``power`` / ``runs_needed`` — power of the t-test at a given n (noncentral t), and the smallest n
  that reaches 80 % power for the observed difference and spread: the "seeds needed" hint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "ALPHA",
    "BOOTSTRAP_MIN_N",
    "BOOTSTRAP_RESAMPLES",
    "MAX_RUNS_NEEDED",
    "METRIC_FUNCTIONS",
    "Interval",
    "TestResult",
    "accuracy",
    "balanced_accuracy",
    "expected_calibration_error",
    "exact_match",
    "hamming_loss",
    "holm",
    "macro_f1",
    "mean_average_precision",
    "micro_average_precision",
    "multilabel_f1",
    "mark",
    "mcnemar",
    "mean_interval",
    "paired_bootstrap",
    "paired_t",
    "per_class_average_precision",
    "per_image_correct",
    "power",
    "runs_needed",
    "t_interval",
    "bootstrap_interval",
    "welch_t",
]

ALPHA = 0.05
"""Significance level of every comparison (after Holm's correction), and 1 - the interval level."""
BOOTSTRAP_MIN_N = 30
"""From this many seeds / folds on, a mean's interval is the bootstrap percentile interval. Below it the
percentile bootstrap is too narrow (it uses normal-like quantiles and the plug-in spread, so with 3 seeds
a nominal 95 % interval covers about 75 %), while the t-interval is exact for normally distributed run
noise and close to it otherwise; at 30 values and more the two agree for normal noise and the bootstrap
no longer assumes symmetry."""
BOOTSTRAP_RESAMPLES = 4000
"""Resamples of every bootstrap (fixed seed: the same runs give the same interval and report)."""
MAX_RUNS_NEEDED = 1000
"""``runs_needed`` gives up beyond this many runs per experiment: the difference is tiny next to the spread."""


@dataclass(frozen=True)
class Interval:
    """A confidence interval of a mean: bounds, the method (``t`` or ``bootstrap``), the level, n."""

    low: float
    high: float
    method: str
    level: float
    n: int


@dataclass(frozen=True)
class TestResult:
    """One comparison of ``a`` against ``b``: the test, its p-value, the difference a - b and its interval.

    ``n`` counts what the test saw: pairs of runs (paired t), runs on the smaller side (Welch), or the
    test images (McNemar, paired bootstrap). ``spread`` is the standard deviation the power estimate
    needs (of the paired differences, or the pooled one of the runs), ``None`` for the per-image tests.
    """

    test: str
    p_value: float
    diff: float
    low: float
    high: float
    n: int
    statistic: float = math.nan
    spread: float | None = None
    paired: bool = True


# --------------------------------------------------------------------------------------------
# intervals of a mean over runs


def t_interval(values: Sequence[float], level: float = 1 - ALPHA) -> Interval:
    """Student's t confidence interval of the mean of ``values`` (at least two)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2:
        raise ValueError("a t-interval needs at least two values")
    mean, se = float(x.mean()), float(x.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return Interval(mean - half, mean + half, "t", level, n)


def bootstrap_interval(values: Sequence[float], level: float = 1 - ALPHA, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> Interval:
    """Bootstrap percentile interval of the mean of ``values`` (scipy's ``bootstrap``, fixed seed)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        raise ValueError("a bootstrap interval needs at least two values")
    if np.ptp(x) == 0:  # every resample has the same mean
        return Interval(float(x[0]), float(x[0]), "bootstrap", level, len(x))
    res = stats.bootstrap((x,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                          random_state=np.random.default_rng(seed), vectorized=True)
    return Interval(float(res.confidence_interval.low), float(res.confidence_interval.high), "bootstrap", level, len(x))


def mean_interval(values: Sequence[float], level: float = 1 - ALPHA, bootstrap_min_n: int = BOOTSTRAP_MIN_N) -> Interval | None:
    """The interval of a mean over runs: t below ``bootstrap_min_n`` values, bootstrap from there; ``None`` for
    fewer than two values (one run: no interval)."""
    n = len(values)
    if n < 2:
        return None
    return bootstrap_interval(values, level) if n >= bootstrap_min_n else t_interval(values, level)


# --------------------------------------------------------------------------------------------
# tests over runs: paired t (same seeds / folds), Welch (several runs that do not pair)


def _constant(x: np.ndarray) -> bool:
    """All values equal, up to floating-point noise (0.9 - 0.8 and 0.8 - 0.7 differ in the 17th digit)."""
    return bool(np.ptp(x) <= 1e-12 * max(1.0, float(np.abs(x).max())))


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 1 - ALPHA) -> TestResult:
    """Paired two-sided t-test of ``a[i] - b[i]`` (the same seed / fold on both sides), at least two pairs.

    Assumes the differences are independent across pairs and roughly normal. Identical differences (no
    spread) give p = 1 when they are 0 and p = 0 otherwise.
    """
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    if n < 2:
        raise ValueError("a paired t-test needs at least two pairs")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if _constant(d):
        mean = float(np.round(mean, 12))
        return TestResult("paired t", 1.0 if mean == 0 else 0.0, mean, mean, mean, n, math.copysign(math.inf, mean) if mean else 0.0, 0.0)
    res = stats.ttest_rel(a, b)
    ci = t_interval(d, level)
    return TestResult("paired t", float(res.pvalue), mean, ci.low, ci.high, n, float(res.statistic), sd)


def welch_t(a: Sequence[float], b: Sequence[float], level: float = 1 - ALPHA) -> TestResult:
    """Welch's two-sided t-test of mean(a) - mean(b) for runs that do not pair (at least two on each side).

    Assumes independent, roughly normal runs; variances may differ. ``spread`` is the root mean square of
    the two standard deviations (what a two-sample power estimate uses).
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("Welch's t-test needs at least two values on each side")
    diff = float(x.mean() - y.mean())
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    spread = float(math.sqrt((x.var(ddof=1) + y.var(ddof=1)) / 2))
    n = min(len(x), len(y))
    if _constant(x) and _constant(y):
        return TestResult("Welch t", 1.0 if diff == 0 else 0.0, diff, diff, diff, n, 0.0, 0.0, paired=False)
    res = stats.ttest_ind(x, y, equal_var=False)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * math.sqrt(vx + vy)
    return TestResult("Welch t", float(res.pvalue), diff, diff - half, diff + half, n, float(res.statistic), spread, paired=False)


# --------------------------------------------------------------------------------------------
# tests over the test images of two single runs: McNemar (accuracy), paired bootstrap (any metric


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool], mid_p: bool = True, level: float = 1 - ALPHA) -> TestResult:
    """McNemar's test of two runs scored on the same test images (``correct_*[i]``: image ``i`` right).

    Only the discordant images count: ``b`` right for ``a`` only, ``c`` for ``b`` only; under the null
    each is equally likely, so ``min(b, c)`` is binomial(b + c, 1/2). The exact two-sided p-value is
    ``min(1, 2 P(X <= min))``; the mid-p value (the default, Fagerland et al. 2013: closer to the nominal
    level, the exact one is conservative) subtracts ``P(X = min)``. Assumes the test images are
    independent draws; it says whether *these two trained models* differ on such images, not whether
    another seed would. The difference interval is Wald's for paired proportions.
    """
    ca, cb = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if ca.shape != cb.shape or ca.ndim != 1 or len(ca) == 0:
        raise ValueError("McNemar's test needs two equally long, non-empty correctness vectors")
    n = len(ca)
    b, c = int(np.sum(ca & ~cb)), int(np.sum(~ca & cb))
    k, m = min(b, c), b + c
    if m == 0:
        p = 1.0
    else:
        p = min(1.0, 2 * float(stats.binom.cdf(k, m, 0.5)))
        if mid_p:
            p = min(1.0, 2 * float(stats.binom.cdf(k, m, 0.5)) - float(stats.binom.pmf(k, m, 0.5)))
    diff = (b - c) / n
    se = math.sqrt(max((b + c) / n - diff**2, 0.0) / n)
    z = float(stats.norm.ppf(0.5 + level / 2))
    return TestResult("McNemar mid-p" if mid_p else "McNemar exact", p, diff, diff - z * se, diff + z * se, n, float(k))


def accuracy(true: np.ndarray, pred: np.ndarray, prob: np.ndarray | None = None) -> float:
    """Share of correct predictions."""
    return float(np.mean(true == pred))


def _per_class(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    k = int(max(true.max(), pred.max())) + 1
    tp = np.bincount(true[true == pred], minlength=k).astype(float)
    return tp, np.bincount(true, minlength=k).astype(float), np.bincount(pred, minlength=k).astype(float)


def balanced_accuracy(true: np.ndarray, pred: np.ndarray, prob: np.ndarray | None = None) -> float:
    """Mean recall over the classes present in ``true`` (sklearn's ``balanced_accuracy_score``)."""
    tp, support, _ = _per_class(true, pred)
    present = support > 0
    return float(np.mean(tp[present] / support[present]))


def macro_f1(true: np.ndarray, pred: np.ndarray, prob: np.ndarray | None = None) -> float:
    """Unweighted mean F1 over the classes present in ``true`` or ``pred`` (0 for a class never right)."""
    tp, support, predicted = _per_class(true, pred)
    present = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=(support + predicted) > 0)
    return float(np.mean(f1[present]))


def expected_calibration_error(true: np.ndarray, pred: np.ndarray, prob: np.ndarray | None = None, bins: int = 15) -> float:
    """ECE (``bins`` equal-width confidence bins, L1) from the top-class probabilities ``prob``."""
    if prob is None:
        raise ValueError("the ECE needs the predicted probabilities")
    idx = np.clip((np.asarray(prob) * bins).astype(int), 0, bins - 1)
    gap = np.bincount(idx, weights=prob, minlength=bins) - np.bincount(idx, weights=(true == pred).astype(float), minlength=bins)
    return float(np.abs(gap).sum() / len(true))


# multi-label: ``true`` and ``pred`` are N×K 0/1 arrays (the label sets), ``prob`` the N×K sigmoid probabilities


def per_image_correct(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Whether each test image was predicted right: its class (1-D labels), or its whole label set (N×K multi-hot)."""
    same = np.asarray(true) == np.asarray(pred)
    return same.all(axis=1) if same.ndim == 2 else same


def per_class_average_precision(true: np.ndarray, score: np.ndarray) -> list[float | None]:
    """Average precision of each column of ``score`` against the 0/1 column of ``true`` (``None`` without a positive).

    scikit-learn's ``average_precision_score`` (and torchmetrics' ``MultilabelAveragePrecision``): over the distinct
    scores, highest first, the sum of (recall gained) × (precision there); tied scores form one step.
    """
    t, s = np.asarray(true, dtype=bool), np.asarray(score, dtype=float)
    out: list[float | None] = []
    for col_t, col_s in zip(t.T, s.T, strict=True):
        positives = int(col_t.sum())
        if positives == 0:
            out.append(None)
            continue
        order = np.argsort(-col_s, kind="stable")
        hits, ranked = np.cumsum(col_t[order]), col_s[order]
        last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last image of each distinct score
        precision, recall = hits[last] / (last + 1), hits[last] / positives
        out.append(float(np.sum(np.diff(recall, prepend=0.0) * precision)))
    return out


def mean_average_precision(true: np.ndarray, pred: np.ndarray | None = None, prob: np.ndarray | None = None) -> float:
    """Macro mAP: the mean per-class average precision over the classes with a positive (``test_map``)."""
    if prob is None:
        raise ValueError("mAP needs the predicted probabilities")
    known = [v for v in per_class_average_precision(true, prob) if v is not None]
    return float(np.mean(known)) if known else math.nan


def micro_average_precision(true: np.ndarray, pred: np.ndarray | None = None, prob: np.ndarray | None = None) -> float:
    """Micro mAP: the average precision of every (image, label) pair pooled (``test_map_micro``)."""
    if prob is None:
        raise ValueError("mAP needs the predicted probabilities")
    value = per_class_average_precision(np.ravel(true)[:, None], np.ravel(prob)[:, None])[0]
    return math.nan if value is None else value


def multilabel_f1(true: np.ndarray, pred: np.ndarray, prob: np.ndarray | None = None) -> float:
    """Macro F1 of multi-hot predictions over all K classes, 0 for a class never true nor predicted (torchmetrics'
    ``MultilabelF1Score``, scikit-learn's ``f1_score(average="macro", zero_division=0)``; ``test_f1``)."""
    t, p = np.asarray(true, dtype=bool), np.asarray(pred, dtype=bool)
    tp, wrong = (t & p).sum(0), (t ^ p).sum(0)
    return float(np.mean(np.divide(2 * tp, 2 * tp + wrong, out=np.zeros(t.shape[1]), where=(2 * tp + wrong) > 0)))


def exact_match(true: np.ndarray, pred: np.ndarray, prob: np.ndarray | None = None) -> float:
    """Share of images whose predicted label set is exactly the true one (subset accuracy; ``test_exact_match``)."""
    return float(np.mean(per_image_correct(true, pred)))


def hamming_loss(true: np.ndarray, pred: np.ndarray, prob: np.ndarray | None = None) -> float:
    """Share of wrong (image, label) decisions (``test_hamming``; lower is better)."""
    return float(np.mean(np.asarray(true) != np.asarray(pred)))


METRIC_FUNCTIONS: dict[str, Callable[..., float]] = {
    "test_acc": accuracy,
    "test_balanced_acc": balanced_accuracy,
    "test_macro_f1": macro_f1,
    "test_ece": expected_calibration_error,
    "test_map": mean_average_precision,
    "test_map_micro": micro_average_precision,
    "test_f1": multilabel_f1,
    "test_exact_match": exact_match,
    "test_hamming": hamming_loss,
}
"""The metrics ``paired_bootstrap`` can recompute from a run's test predictions: (true, pred, top probability) of a
multiclass run, (N×K true, N×K predicted label sets, N×K probabilities) of a multi-label one."""


def paired_bootstrap(
    true: np.ndarray,
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    metric: Callable[..., float] = accuracy,
    prob_a: np.ndarray | None = None,
    prob_b: np.ndarray | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 1 - ALPHA,
    seed: int = 0,
) -> TestResult:
    """Paired bootstrap of ``metric(a) - metric(b)`` over the test images both runs predicted.

    The images are resampled with replacement, the same indices for both runs, ``resamples`` times: the
    percentile interval of the difference, and the two-sided p-value ``2 min(P(d* <= 0), P(d* >= 0))``
    (at least ``1 / resamples``). Assumes independent test images, like McNemar's test.
    """
    true, pred_a, pred_b = (np.asarray(v) for v in (true, pred_a, pred_b))
    n = len(true)
    if not (n and len(pred_a) == n == len(pred_b)):
        raise ValueError("a paired bootstrap needs predictions of the same, non-empty test images")
    diff = metric(true, pred_a, prob_a) - metric(true, pred_b, prob_b)
    rng = np.random.default_rng(seed)
    ds = np.empty(resamples)
    for i in range(resamples):
        j = rng.integers(0, n, n)
        ds[i] = metric(true[j], pred_a[j], None if prob_a is None else prob_a[j]) - metric(
            true[j], pred_b[j], None if prob_b is None else prob_b[j])
    lo, hi = np.quantile(ds, [0.5 - level / 2, 0.5 + level / 2])
    p = min(1.0, max(2 * min(np.mean(ds <= 0), np.mean(ds >= 0)), 1 / resamples)) if np.ptp(ds) or diff else 1.0
    return TestResult("paired bootstrap", float(p), float(diff), float(lo), float(hi), n)


# --------------------------------------------------------------------------------------------
# several comparisons: Holm; what a result means; how many runs would resolve it


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): controls the family-wise error rate.

    Sorted ascending, the i-th (from 0) of m is multiplied by m - i, then made non-decreasing, capped at 1.
    """
    p = np.asarray(p_values, dtype=float)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate(p[order] * (m - np.arange(m))))
    out = np.empty(m)
    out[order] = adj
    return [float(v) for v in out]


def mark(diff: float, p_adjusted: float, higher_is_better: bool = True, alpha: float = ALPHA) -> str:
    """``better``, ``worse`` (than the reference: adjusted p below ``alpha``) or ``not distinguishable``."""
    if not p_adjusted < alpha or diff == 0:
        return "not distinguishable"
    return "better" if (diff > 0) == higher_is_better else "worse"


def power(effect: float, n: int, alpha: float = ALPHA, paired: bool = True) -> float:
    """Power of the two-sided t-test at standardised effect ``effect`` (difference / spread).

    ``paired``: the one-sample test of ``n`` paired differences (df n - 1, noncentrality effect·√n, as
    statsmodels' ``TTestPower``); else two independent groups of ``n`` (df 2n - 2, noncentrality
    effect·√(n/2), as ``TTestIndPower``).
    """
    df, nc = (n - 1, effect * math.sqrt(n)) if paired else (2 * n - 2, effect * math.sqrt(n / 2))
    if df < 1:
        return math.nan
    crit = float(stats.t.isf(alpha / 2, df))
    upper = float(stats.nct.sf(crit, df, nc))
    if not math.isfinite(upper):  # scipy's nct gives NaN far in the tail: there the power is the normal one (about 1)
        upper = float(stats.norm.sf(crit - nc))
    lower = float(stats.nct.cdf(-crit, df, nc))
    return upper + (lower if math.isfinite(lower) else float(stats.norm.cdf(-crit - nc)))


def runs_needed(diff: float, spread: float | None, alpha: float = ALPHA, target: float = 0.8, paired: bool = True,
                max_n: int = MAX_RUNS_NEEDED) -> int | None:
    """The smallest number of runs per experiment (pairs when ``paired``) with which a true difference of
    ``diff`` at the observed ``spread`` would be found with probability ``target``; ``None`` when it
    would take more than ``max_n`` (or the spread is unknown or there is no difference)."""
    if spread is None or not spread > 0 or diff == 0 or not math.isfinite(diff):
        return None
    effect = abs(diff) / spread
    if power(effect, max_n, alpha, paired) < target:
        return None
    lo, hi = 2, max_n  # power grows with n: bisect for the first n that reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        if power(effect, mid, alpha, paired) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo
