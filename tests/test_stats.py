"""The statistics of the comparisons (``transferlab.results.stats``) against scipy and statsmodels, on fixed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from transferlab.results import stats

A = [0.912, 0.905, 0.921, 0.899, 0.915]
B = [0.901, 0.899, 0.910, 0.893, 0.902]


def test_t_interval_is_scipys():
    ci = stats.mean_interval(A)
    low, high = sps.t.interval(0.95, len(A) - 1, loc=np.mean(A), scale=sps.sem(A))
    assert ci is not None and ci.method == "t" and ci.n == 5
    assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-12)
    assert stats.mean_interval([0.9]) is None  # one run: no interval
    assert stats.mean_interval([]) is None


def test_bootstrap_only_from_the_threshold_on_and_reproducible():
    rng = np.random.default_rng(1)
    small = list(rng.normal(0.9, 0.01, stats.BOOTSTRAP_MIN_N - 1))
    large = list(rng.normal(0.9, 0.01, stats.BOOTSTRAP_MIN_N))
    assert stats.mean_interval(small).method == "t"
    ci = stats.mean_interval(large)
    assert ci.method == "bootstrap" and ci == stats.mean_interval(large)  # fixed seed: the same interval every time
    ref = sps.bootstrap((np.asarray(large),), np.mean, n_resamples=stats.BOOTSTRAP_RESAMPLES, method="percentile",
                        random_state=np.random.default_rng(0)).confidence_interval
    assert (ci.low, ci.high) == pytest.approx((ref.low, ref.high))
    t = stats.t_interval(large)  # for normal noise at n = 30 the two agree closely
    assert abs(ci.low - t.low) < 0.2 * (t.high - t.low) and abs(ci.high - t.high) < 0.2 * (t.high - t.low)
    const = stats.bootstrap_interval([0.5, 0.5, 0.5])
    assert (const.low, const.high) == (0.5, 0.5)


def test_paired_t_is_scipys_ttest_rel():
    r = stats.paired_t(A, B)
    ref = sps.ttest_rel(A, B)
    assert r.p_value == pytest.approx(ref.pvalue, rel=1e-12) and r.statistic == pytest.approx(ref.statistic)
    d = np.subtract(A, B)
    assert r.diff == pytest.approx(d.mean()) and r.spread == pytest.approx(d.std(ddof=1)) and r.n == 5
    low, high = sps.t.interval(0.95, 4, loc=d.mean(), scale=sps.sem(d))
    assert (r.low, r.high) == pytest.approx((low, high))
    # no spread in the differences: decided without a t statistic
    assert stats.paired_t([0.9, 0.8], [0.9, 0.8]).p_value == 1.0
    assert stats.paired_t([0.9, 0.8], [0.8, 0.7]).p_value == 0.0
    with pytest.raises(ValueError, match="two pairs"):
        stats.paired_t([0.9], [0.8])


def test_welch_is_scipys_and_its_interval_statsmodels():
    from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

    a, b = A, B[:3]
    r = stats.welch_t(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert r.p_value == pytest.approx(ref.pvalue) and not r.paired
    low, high = CompareMeans(DescrStatsW(np.asarray(a)), DescrStatsW(np.asarray(b))).tconfint_diff(usevar="unequal")
    assert (r.low, r.high) == pytest.approx((low, high))


def _correctness(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return np.asarray(a, bool), np.asarray(b, bool)


@pytest.mark.parametrize("only_a, only_b", [(12, 5), (3, 3), (0, 9), (1, 0), (40, 22)])
def test_mcnemar_exact_is_statsmodels_and_mid_p_below_it(only_a, only_b):
    ca, cb = _correctness(300, only_a, only_b, 20)
    exact = stats.mcnemar(ca, cb, mid_p=False)
    ref = sm_mcnemar([[300, only_a], [only_b, 20]], exact=True).pvalue
    assert exact.p_value == pytest.approx(ref, rel=1e-12)
    mid = stats.mcnemar(ca, cb)
    k, n = min(only_a, only_b), only_a + only_b
    # mid-p: the exact p-value less the probability of the observed count (Fagerland et al. 2013)
    assert mid.p_value == pytest.approx(min(1.0, 2 * sps.binom.cdf(k, n, 0.5) - sps.binom.pmf(k, n, 0.5)))
    if ref < 1:
        assert mid.p_value == pytest.approx(ref - sps.binom.pmf(k, n, 0.5))
    assert mid.p_value <= exact.p_value
    assert mid.diff == pytest.approx((only_a - only_b) / len(ca)) and mid.n == len(ca)
    assert stats.mcnemar(ca, ca).p_value == 1.0


def test_paired_bootstrap_finds_a_shift_and_not_a_null():
    true = np.arange(400) % 4
    base = true.copy()
    base[:40] = (base[:40] + 1) % 4  # 40 wrong
    worse = true.copy()
    worse[:120] = (worse[:120] + 1) % 4  # the same 40 and 80 more
    swapped = true.copy()
    swapped[200:240] = (swapped[200:240] + 1) % 4  # 40 other ones wrong
    for metric in (stats.accuracy, stats.balanced_accuracy, stats.macro_f1):
        r = stats.paired_bootstrap(true, worse, base, metric, resamples=1000)
        assert r.diff < 0 and r.high < 0 and r.p_value <= 0.002
        n = stats.paired_bootstrap(true, swapped, base, metric, resamples=1000)
        assert n.p_value > 0.5 and n.low < 0 < n.high
    assert stats.paired_bootstrap(true, worse, base).diff == pytest.approx(-0.2)


def test_the_recomputed_metrics_are_sklearns():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    pred[:150] = true[:150]
    assert stats.balanced_accuracy(true, pred) == pytest.approx(balanced_accuracy_score(true, pred))
    assert stats.macro_f1(true, pred) == pytest.approx(f1_score(true, pred, average="macro"))
    prob = rng.uniform(0.2, 1.0, 300)
    ece = stats.expected_calibration_error(true, pred, prob)
    edges = np.linspace(0, 1, 16)
    by_hand = sum(abs(prob[m].mean() - (true == pred)[m].mean()) * m.mean() for m in
                  (((prob > lo) & (prob <= hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)) if m.any())
    assert ece == pytest.approx(by_hand, abs=0.02)  # bins differ only at exact edges


def test_holm_is_statsmodels():
    for p in ([0.01, 0.04, 0.03, 0.005], [0.2, 0.5, 0.01], [0.04], [0.001, 0.001, 0.9, 0.02, 0.049]):
        assert stats.holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))
    assert stats.holm([]) == []


def test_power_and_runs_needed_are_statsmodels():
    for effect, n in ((0.5, 10), (1.2, 3), (0.1, 200), (2.0, 2)):
        assert stats.power(effect, n) == pytest.approx(TTestPower().power(effect, n, 0.05))
        assert stats.power(effect, n, paired=False) == pytest.approx(TTestIndPower().power(effect, n, 0.05))
    for effect, alpha in ((0.5, 0.05), (0.8, 0.025), (1.5, 0.05), (0.3, 0.01)):
        need = stats.runs_needed(effect, 1.0, alpha)
        assert need == math.ceil(TTestPower().solve_power(effect, nobs=None, alpha=alpha, power=0.8))
        need = stats.runs_needed(effect, 1.0, alpha, paired=False)
        assert need == math.ceil(TTestIndPower().solve_power(effect, nobs1=None, alpha=alpha, power=0.8))
    assert stats.runs_needed(0.001, 1.0) is None  # more than MAX_RUNS_NEEDED
    assert stats.runs_needed(0.0, 1.0) is None and stats.runs_needed(0.1, None) is None


def test_marks_follow_the_direction_of_the_metric():
    assert stats.mark(0.02, 0.01) == "better" and stats.mark(-0.02, 0.01) == "worse"
    assert stats.mark(-0.02, 0.01, higher_is_better=False) == "better"  # ECE: lower is better
    assert stats.mark(0.02, 0.05) == stats.mark(0.0, 0.0) == "not distinguishable"
