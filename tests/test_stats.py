"""mmlg_ray.report.stats on constructed cases whose answers are known by hand."""

import math

import numpy as np
import pytest

from mmlg_ray.report import stats


def test_holm_matches_a_hand_computed_example():
    # sorted p: 0.01, 0.02, 0.03, 0.04 (m = 4): 4*0.01=0.04, 3*0.02=0.06, 2*0.03=0.06, 1*0.04=0.04 -> running max
    p = [0.03, 0.01, float("nan"), 0.04, 0.02]
    adj = stats.holm(p)
    assert adj[1] == pytest.approx(0.04)
    assert adj[4] == pytest.approx(0.06)
    assert adj[0] == pytest.approx(0.06)
    assert adj[3] == pytest.approx(0.06)  # step-down: never below an earlier adjusted value
    assert math.isnan(adj[2])  # not in the family
    assert stats.holm([0.5, 0.6]).tolist() == [1.0, 1.0]  # capped at 1
    # Benjamini-Hochberg beside it: 0.01*4/1=0.04, 0.02*4/2=0.04, 0.03*4/3=0.04, 0.04*4/4=0.04
    assert np.allclose(stats.bh(p)[[0, 1, 3, 4]], 0.04) and math.isnan(stats.bh(p)[2])


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_seeds():
    rng = np.random.default_rng(1)
    small = rng.normal(50, 4, 4)
    big = np.concatenate([small, rng.normal(50, 4, 60)])
    a, b = stats.mean_ci(small), stats.mean_ci(big)
    for r, x in ((a, small), (b, big)):
        assert r["lo"] < r["mean"] < r["hi"] and r["mean"] == pytest.approx(x.mean()) and r["n"] == len(x)
        assert r["ci_method"] in ("BCa", "percentile")
    assert (b["hi"] - b["lo"]) < 0.6 * (a["hi"] - a["lo"])
    assert stats.mean_ci([3.0, 3.0, 3.0])["lo"] == 3.0  # no spread: the interval is the value
    assert math.isnan(stats.mean_ci([3.0])["lo"])  # one seed: no interval
    assert stats.mean_ci(small, seed=0)["lo"] == stats.mean_ci(small, seed=0)["lo"]  # seeded


def test_difference_ci_and_welch():
    a, b = [60.0, 61.0, 62.0, 61.5], [50.0, 51.0, 49.5, 50.5]
    d = stats.diff_ci(a, b)
    assert d["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert 0 < d["lo"] < d["diff"] < d["hi"]
    assert stats.welch_p(a, b) < 1e-4
    assert stats.welch_p(a, a) == pytest.approx(1.0)
    assert math.isnan(stats.welch_p([1.0, 1.0], [2.0, 2.0]))  # no spread: undefined, never "significant"


def test_crossing_on_a_ladder_linear_in_log_compute():
    compute = [1e10, 2e10, 4e10, 8e10]
    scores = [40.0, 50.0, 60.0, 70.0]  # 10 points per doubling
    c, kind = stats.crossing(compute, scores, 55.0)
    assert kind == "crossing" and c == pytest.approx(2e10 * math.sqrt(2))
    c, kind = stats.crossing(list(reversed(compute)), list(reversed(scores)), 65.0)  # order does not matter
    assert kind == "crossing" and c == pytest.approx(4e10 * math.sqrt(2))
    assert stats.crossing(compute, scores, 75.0) == (8e10, "never")
    assert stats.crossing(compute, scores, 40.0) == (1e10, "always")
    # a dip is pooled by the isotonic fit: 50, 70, 60 -> 50, 65, 65; 57.5 lies halfway to the second point
    c, kind = stats.crossing([1e10, 1e11, 1e12], [50.0, 70.0, 60.0], 57.5)
    assert kind == "crossing" and c == pytest.approx(10**10.5)


def test_equal_accuracy_with_seeds_known_answer_and_bounds():
    noise = np.array([-0.5, 0.0, 0.5])
    ladder = [(1e10 * 2**k, 40.0 + 10 * k + noise) for k in range(4)]
    ea = stats.equal_accuracy(ladder, 55.0 + noise, own_compute=1e10, n_resamples=400)
    assert ea.kind == "crossing" and ea.compute == pytest.approx(2e10 * math.sqrt(2))
    assert ea.lo < ea.compute < ea.hi and ea.saved == pytest.approx(ea.compute - 1e10)
    assert ea.ratio == pytest.approx(2 * math.sqrt(2))
    never = stats.equal_accuracy(ladder, 90.0 + noise, own_compute=1e10, n_resamples=200)
    assert never.kind == "never" and never.compute == 8e10 and never.hi == math.inf and never.frac_never == 1.0
    always = stats.equal_accuracy(ladder, 30.0 + noise, own_compute=1e10, n_resamples=200)
    assert always.kind == "always" and always.compute == 1e10 and always.lo == -math.inf and always.frac_always == 1.0
    # a target near the top: some resamples fall off the ladder, the interval says so
    edge = stats.equal_accuracy(ladder, 69.8 + noise * 4, own_compute=1e10, n_resamples=400)
    assert edge.kind == "crossing" and edge.hi == math.inf and 0 < edge.frac_never < 1
