"""The sweep's search as plain bookkeeping (mmlg_ray.engine.search, no Ray): common random candidates per
shape, Optuna TPE per cell after the start-up, asynchronous successive halving per cell, seed
re-runs at each cell's best by validation, and a state that a restored run continues from."""

import json
import math

import pytest

from mmlg_ray.engine.arms import Cell
from mmlg_ray.engine.search import FINISHED, SearchSettings, SweepPlan, shape_candidates, startup_count


def settings(**kw):
    base = dict(
        num_samples=2,
        startup=2,
        seeds=[0, 1],
        lr=(1e-4, 3e-3),
        weight_decay=(0.0, 0.2),
        grace_period=1,
        reduction_factor=2,
        max_t=4,
        seed=0,
    )
    return SearchSettings(**{**base, **kw})


ARMS = [("mmlg", "fixed", 0.0), ("tleg", "fixed", 0.0), ("scratch", "", 0.0), ("pt_ft", "", 1.0)]


def grid(shapes=(("image", 2, 64), ("text", 1, 32))):
    return [Cell(mod, d, w, m, e, b) for mod, d, w in shapes for m, e, b in ARMS]


def drain(plan, score=lambda job: 0.5, stop_at=None):
    """Run the plan to its end, each trial finishing at once with score(job); returns the jobs."""
    jobs, n = [], 0
    while True:
        tid = f"t{n}"
        job = plan.next_trial(tid)
        if job == FINISHED:
            return jobs
        assert job is not None
        n += 1
        jobs.append({**job, "trial_id": tid})
        plan.complete(tid, "finished", score(job))


def test_every_arm_of_a_shape_gets_the_same_candidates_and_shapes_differ():
    plan = SweepPlan(grid(), settings(num_samples=3, startup=3))
    jobs = drain(plan)
    search = [j for j in jobs if j["phase"] == "search"]
    assert len(search) == 8 * 3
    by_shape = {}
    for j in search:
        shape = Cell.of(j["cell"]).shape
        by_shape.setdefault(shape, {}).setdefault(j["cell"], []).append((j["candidate"], j["lr"], j["weight_decay"]))
    for shape, cells in by_shape.items():
        lists = [sorted(v) for v in cells.values()]
        assert len(lists) == 4 and all(v == lists[0] for v in lists), shape  # common random numbers
        assert [c for c, _, _ in lists[0]] == [0, 1, 2]
    a, b = (sorted(next(iter(c.values()))) for c in by_shape.values())
    assert a != b  # another shape, other draws
    lo, hi = plan.settings.lr
    assert all(lo <= j["lr"] <= hi and 0 <= j["weight_decay"] <= 0.2 for j in search)


def test_startup_count_follows_num_samples():
    assert [startup_count(n) for n in (1, 2, 4, 5, 12, 30)] == [1, 2, 4, 4, 4, 10]
    assert startup_count(30, override=6) == 6 and startup_count(3, override=6) == 3


def test_tpe_takes_over_after_the_startup_and_adapts_to_each_cells_scores():
    """After 6 common candidates, each cell's TPE proposes from its own observations: a cell whose
    score rises with lr is proposed learning rates near the top of the range, one whose score falls
    with it near the bottom (random draws would centre on the middle, 1e-3, for both)."""
    cells = [Cell("image", 2, 64, "scratch"), Cell("image", 2, 64, "mmlg", "fixed")]
    plan = SweepPlan(cells, settings(num_samples=30, startup=6, seeds=[0], lr=(1e-5, 1e-1)))
    rising, falling = cells[0].key, cells[1].key

    def score(job):
        u = math.log(job["lr"])
        return u if job["cell"] == rising else -u

    jobs = drain(plan, score)
    first = {c: [j["lr"] for j in jobs if j["cell"] == c and j["candidate"] < 6] for c in (rising, falling)}
    assert first[rising] == first[falling]  # the start-up: common
    last = {c: [j["lr"] for j in jobs if j["cell"] == c and j["candidate"] >= 18] for c in (rising, falling)}
    assert len(last[rising]) == len(last[falling]) == 12
    geo = {c: math.exp(sum(math.log(v) for v in last[c]) / 12) for c in last}
    assert geo[rising] > 3e-3 and geo[falling] < 3e-4, geo


def test_successive_halving_cuts_within_a_cell_only_and_never_a_seed_rerun():
    cells = [Cell("image", 2, 64, "scratch"), Cell("text", 1, 32, "scratch")]
    plan = SweepPlan(cells, settings(num_samples=3, startup=3, max_t=4))
    a = [plan.next_trial(f"a{i}") for i in range(6)]
    ids = {}
    for i, job in enumerate(a):
        ids.setdefault(job["cell"], []).append(f"a{i}")
    img, txt = ids[cells[0].key], ids[cells[1].key]
    assert not plan.observe(img[0], 1, 50.0)  # alone at the rung: never cut
    assert not plan.observe(txt[0], 1, 5.0)  # another cell's low score changes nothing in this one
    assert plan.observe(img[1], 1, 10.0)  # below the rung's median of its own cell: cut
    assert not plan.observe(img[2], 1, 60.0)
    assert not plan.observe(img[2], 2, 0.0)  # rungs 1 and 2 (grace 1, rf 2, max_t 4): alone at 2
    assert plan.observe(img[0], 2, -1.0)  # below img[2]'s 0.0 at rung 2: cut
    for t in img + txt:
        plan.complete(t, "finished", 1.0)
    seeds = [plan.next_trial(f"s{i}") for i in range(2)]
    assert {j["phase"] for j in seeds} == {"seeds"}
    assert not plan.observe("s0", 1, -1e9)  # seed re-runs are never cut


def test_seed_reruns_use_the_best_validation_score_and_a_finished_trial_before_one_cut_short():
    cell = Cell("image", 2, 64, "scratch")
    plan = SweepPlan([cell], settings(num_samples=3, startup=3, seeds=[0, 1, 2]))
    jobs = [plan.next_trial(f"t{i}") for i in range(3)]
    assert plan.next_trial("x") is None  # its search is still running: nothing to start yet
    plan.complete("t0", "finished", 20.0)
    plan.complete("t1", "stopped_early", 90.0)  # cut short: its score is from fewer steps
    plan.complete("t2", "finished", 30.0)
    seeds = [plan.next_trial(f"s{i}") for i in range(2)]
    assert [s["seed"] for s in seeds] == [1, 2]
    assert all(
        (s["lr"], s["weight_decay"], s["candidate"]) == (jobs[2]["lr"], jobs[2]["weight_decay"], 2) for s in seeds
    )
    assert plan.next_trial("s2") is None  # seeds running
    plan.complete("s0", "finished", 1.0)
    plan.complete("s1", "finished", 1.0)
    assert plan.next_trial("s3") == FINISHED and plan.missing() == []


def test_an_errored_cell_waits_for_a_resume_then_gets_its_seeds_and_a_changed_best_supersedes_old_ones():
    a, b = Cell("image", 2, 64, "scratch"), Cell("text", 1, 32, "scratch")
    plan = SweepPlan([a, b], settings(num_samples=2, startup=2))
    jobs = {f"t{i}": plan.next_trial(f"t{i}") for i in range(4)}
    tid = {(j["cell"], j["candidate"]): t for t, j in jobs.items()}
    plan.complete(tid[(a.key, 0)], "error")
    plan.complete(tid[(a.key, 1)], "finished", 10.0)
    plan.complete(tid[(b.key, 0)], "error")
    plan.complete(tid[(b.key, 1)], "error")
    s = plan.next_trial("s0")
    assert s["cell"] == a.key and s["phase"] == "seeds" and s["candidate"] == 1
    plan.complete("s0", "finished", 9.0)
    assert plan.next_trial("s1") == FINISHED  # b has no finished trial: nothing this run can do
    assert sorted(plan.missing()) == sorted([a.key, b.key])  # a lost a candidate, b everything

    # a restored run (the state through JSON) retries the errored trials, which now finish
    again = SweepPlan([a, b], settings(num_samples=2, startup=2))
    again.load_state(json.loads(json.dumps(plan.state())))
    for t in (tid[(a.key, 0)], tid[(b.key, 0)], tid[(b.key, 1)]):
        again.resumed(t)
    again.complete(tid[(a.key, 0)], "finished", 50.0)  # better than the candidate a's seeds ran at
    again.complete(tid[(b.key, 0)], "finished", 5.0)
    again.complete(tid[(b.key, 1)], "finished", 7.0)
    jobs_a, jobs_b = again.seed_jobs(a.key), again.seed_jobs(b.key)
    assert [(j["candidate"], j["seed"]) for j in jobs_a] == [(0, 1)]  # a's seeds at its new best
    assert [(j["candidate"], j["seed"]) for j in jobs_b] == [(1, 1)]
    assert again.superseded("s0")  # the seed re-run at a's old best stays on record as superseded
    for i, j in enumerate(jobs_a + jobs_b):
        again.add(f"f{i}", j)
        again.complete(f"f{i}", "finished", 1.0)
    assert again.missing() == []


def test_the_plan_continues_from_its_saved_state_as_if_never_stopped():
    cells = grid()
    ref = SweepPlan(cells, settings(num_samples=6, startup=2))
    other = SweepPlan(cells, settings(num_samples=6, startup=2))
    for i in range(20):
        j1, j2 = ref.next_trial(f"t{i}"), other.next_trial(f"t{i}")
        assert j1 == j2
        ref.complete(f"t{i}", "finished", float(i % 7))
        other.complete(f"t{i}", "finished", float(i % 7))
        if i == 9:  # "restore" the other one from its JSON state
            state = json.loads(json.dumps(other.state()))
            other = SweepPlan(cells, settings(num_samples=6, startup=2))
            other.load_state(state)


@pytest.mark.parametrize("n", [1, 3])
def test_shape_candidates_are_reproducible(n):
    assert shape_candidates(0, "image|2|64", n, (1e-4, 3e-3), (0, 0.2)) == shape_candidates(
        0, "image|2|64", n, (1e-4, 3e-3), (0, 0.2)
    )
    assert shape_candidates(1, "image|2|64", n, (1e-4, 3e-3), (0, 0.2)) != shape_candidates(
        0, "image|2|64", n, (1e-4, 3e-3), (0, 0.2)
    )


def test_the_plan_bounds_how_many_trials_run_at_once_resumed_ones_included():
    plan = SweepPlan(grid(), settings(num_samples=3, startup=3, max_concurrent=2))
    assert plan.next_trial("a") and plan.next_trial("b")
    assert plan.next_trial("c") is None  # two running: wait
    plan.complete("a", "error")
    assert plan.next_trial("c")
    plan.resumed("a")  # retried on --resume: running again, and counted
    assert plan.next_trial("d") is None


def test_an_errored_seed_rerun_is_retried_in_place_never_run_twice():
    """A seed re-run that errored stays the cell's (--resume retries that same trial): the plan never
    proposes its (seed, hyper-parameters) again, in this run or a follow-up round."""
    cell = Cell("image", 2, 64, "scratch")
    plan = SweepPlan([cell], settings(num_samples=1, startup=1))
    plan.next_trial("s")
    plan.complete("s", "finished", 10.0)
    plan.next_trial("a")
    plan.complete("a", "error")
    assert plan.missing() == [cell.key] and plan.seed_jobs(cell.key) == []
    assert plan.next_trial("b") == FINISHED
    plan.resumed("a")
    plan.complete("a", "finished", 11.0)
    assert plan.missing() == []


def test_successive_halving_decides_as_tunes_asha_bracket():
    """The plan's rule against Ray Tune's own _Bracket (its ASHA's rung logic) on random score streams."""
    import random
    from types import SimpleNamespace

    from ray.tune.schedulers.async_hyperband import _Bracket

    rnd = random.Random(0)
    for grace, rf, max_t in [(1, 2, 4), (1, 3, 9), (2, 2, 8), (1, 2, 3)]:
        cell = Cell("image", 2, 64, "scratch")
        plan = SweepPlan(
            [cell], settings(num_samples=8, startup=8, max_t=max_t, grace_period=grace, reduction_factor=rf)
        )
        bracket = _Bracket(min_t=grace, max_t=max_t, reduction_factor=rf, s=0)
        live = {}
        for i in range(8):
            plan.next_trial(f"t{i}")
            live[f"t{i}"] = 0
        decisions = 0
        while live:
            tid = rnd.choice(sorted(live))
            live[tid] += rnd.choice([1, 1, 1, 2])  # a restarted trial may skip an iteration
            it, score = live[tid], rnd.choice([rnd.random() * 100, float(rnd.randint(0, 3))])
            ours = plan.observe(tid, it, score)
            tunes = bracket.on_result(SimpleNamespace(trial_id=tid), it, score) == "STOP"
            assert ours == tunes, (grace, rf, max_t, tid, it, score)
            decisions += 1
            if ours or it >= max_t:
                del live[tid]
        assert decisions > 8


def test_proposals_made_before_the_startup_trials_end_stay_common():
    """Proposed concurrently, before `startup` trials of a cell have scores, every candidate is the
    shape's common one: TPE would only draw at random there, differently for every arm."""
    cells = [Cell("image", 2, 64, "scratch"), Cell("image", 2, 64, "mmlg", "fixed")]
    plan = SweepPlan(cells, settings(num_samples=8, startup=4, seeds=[0]))
    jobs = [plan.next_trial(f"t{i}") for i in range(16)]
    by_cell = {}
    for j in jobs:
        by_cell.setdefault(j["cell"], []).append((j["candidate"], j["lr"], j["weight_decay"]))
    a, b = by_cell.values()
    assert sorted(a) == sorted(b) and len(set(a)) == 8


def test_startup_samples_reaches_the_plan_from_the_config():
    from mmlg_ray.config import load_config

    s = SearchSettings.of(
        load_config(None, ["ray.tune.num_samples=6", "ray.tune.startup_samples=3", "ray.tune.max_concurrent=5"])
    )
    assert (s.num_samples, s.startup, s.max_concurrent) == (6, 3, 5)
    assert SearchSettings.of(load_config(None, ["ray.tune.num_samples=12"])).startup == 4
