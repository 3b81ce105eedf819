"""The sweep's search, as plain bookkeeping (no Ray): which trial runs next, which one a cell keeps,
and when a trial is cut short. Both executors drive it: the Ray layer through a Tune searcher and a
Tune scheduler, the in-process executor by a loop.

- Common random numbers. Every arm of one descendant shape is searched on the same hyper-parameter
  candidates: the first `startup` candidates of a shape are drawn once, from the sweep's seed and
  the shape, and given to every arm's study. Two arms of a shape then differ in their initialization
  only, not in their luck of the draw.
- Adaptive after that. Each cell (arm x shape) has its own Optuna study; once `startup` of its
  trials have ended, Optuna's TPE proposes the rest from what that cell has seen. `startup` follows
  num_samples (ray.tune.startup_samples overrides it), so a cell with more samples than its start-up
  count does leave random search.
- Early stopping per cell: asynchronous successive halving (the rule of Tune's ASHA, rungs at
  grace_period x reduction_factor^k evaluations), comparing a trial only with trials of its own cell,
  on the validation score. Seed re-runs are never cut.
- Seeds: once every search trial of a cell has ended, the cell's best trial (by validation: a trial
  that ran its whole budget before one cut short) is re-run with each further seed.

The plan's whole state is its trial records (JSON): every proposal and every rung is computed from
them, so a restored sweep continues exactly where the records end.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

from mmlg_ray.engine.arms import Cell

log = logging.getLogger("mmlg_ray")
FINISHED = "FINISHED"  # next_trial: nothing left to suggest in this run
METRIC = "val_score"  # search, early stopping and selection read validation, never test


def startup_count(num_samples: int, override: int | None = None) -> int:
    """Common random candidates per shape before a cell's sampler adapts: all of a small budget (at
    most 4), else a third of it, at least 4 (TPE needs a few points to model anything)."""
    if override is not None:
        return max(1, min(num_samples, override))
    return num_samples if num_samples <= 4 else max(4, num_samples // 3)


def _seed_of(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def shape_candidates(
    seed: int, shape: str, n: int, lr: tuple[float, float], weight_decay: tuple[float, float]
) -> list[dict]:
    """The first `n` hyper-parameter candidates of a shape: lr log-uniform, weight decay uniform,
    drawn from (seed, shape) alone, so every arm of the shape gets the very same ones."""
    import numpy as np

    rng = np.random.default_rng(_seed_of("candidates", seed, shape))
    out = []
    for _ in range(n):
        u, v = rng.random(2)
        out.append(
            {
                "lr": float(math.exp(math.log(lr[0]) + u * (math.log(lr[1]) - math.log(lr[0])))),
                "weight_decay": float(weight_decay[0] + v * (weight_decay[1] - weight_decay[0])),
            }
        )
    return out


@dataclass
class SearchSettings:
    num_samples: int
    startup: int
    seeds: list[int]
    lr: tuple[float, float]
    weight_decay: tuple[float, float]
    grace_period: int
    reduction_factor: int
    max_t: int
    seed: int = 0
    max_concurrent: int = 0  # trials running at once (0: no bound)

    @classmethod
    def of(cls, cfg) -> "SearchSettings":
        t, f = cfg.ray.tune, cfg.descendants.finetune
        return cls(
            num_samples=t.num_samples,
            startup=startup_count(t.num_samples, t.startup_samples),
            seeds=list(cfg.descendants.seeds),
            lr=tuple(t.search_space.lr),
            weight_decay=tuple(t.search_space.weight_decay),
            grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
            max_t=-(-f.steps // f.eval_every),
            seed=cfg.seed,
            max_concurrent=t.max_concurrent,
        )


class SweepPlan:
    """Search, early stopping and seed re-runs of every cell; see the module's doc.

    `records[trial_id]` = {cell, phase, seed, lr, weight_decay, status, score, rungs}; status is
    running | finished | stopped_early | error. `ready(cell)` tells whether a cell's inputs exist
    (a pt_ft cell waits for its pre-trained shape); a cell that is not ready is passed over."""

    def __init__(self, cells: list[Cell], settings: SearchSettings):
        self.cells = [c.key for c in cells]
        self.settings = settings
        self.records: dict[str, dict] = {}
        self.cursor = 0
        self._by_cell: dict[str, list[str]] = {}  # indexes of the records (per cell; the running ones), so that
        self._live: set[str] = set()  # a suggestion costs the same at 100 trials as at 10,000

    # ------------------------------------------------------------------ state
    def state(self) -> dict:
        return {"records": self.records, "cursor": self.cursor}

    def load_state(self, state: dict) -> None:
        self.records, self._by_cell, self._live = {}, {}, set()
        for k, v in state["records"].items():
            self._put(k, dict(v))
        self.cursor = int(state.get("cursor", 0))

    def _put(self, trial_id: str, record: dict) -> None:
        if trial_id not in self.records:
            self._by_cell.setdefault(record["cell"], []).append(trial_id)
        self.records[trial_id] = record
        self._status(trial_id, record["status"])

    def _status(self, trial_id: str, status: str) -> None:
        self.records[trial_id]["status"] = status
        (self._live.add if status == "running" else self._live.discard)(trial_id)

    # ------------------------------------------------------------------ the search of one cell
    def _of(self, cell: str, phase: str | None = None) -> list[tuple[str, dict]]:
        return [
            (t, self.records[t])
            for t in self._by_cell.get(cell, ())
            if phase is None or self.records[t]["phase"] == phase
        ]

    def _propose(self, cell: str) -> dict:
        """The next candidate of a cell: the shape's next common candidate while any is left, then
        Optuna's TPE over the cell's ended search trials. The study is built afresh from the records,
        its sampler seeded by the cell and the count so far: a proposal is a function of the records,
        so a restored run proposes exactly what the uninterrupted one would have."""
        s = self.settings
        search = self._of(cell, "search")
        ended = [
            r
            for _, r in search
            if r["status"] in ("finished", "stopped_early")
            and r.get("score") is not None
            and not math.isnan(r["score"])
        ]
        if len(search) < s.startup or len(ended) < s.startup:
            # the shape's common candidates, until `startup` of this cell's trials have scores for TPE
            # (fewer, and Optuna's TPE would draw at random, differently for every arm)
            return shape_candidates(s.seed, Cell.of(cell).shape, s.num_samples, s.lr, s.weight_decay)[len(search)]
        import optuna
        from optuna.distributions import FloatDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dists = {
            "lr": FloatDistribution(s.lr[0], s.lr[1], log=True)
            if s.lr[0] < s.lr[1]
            else FloatDistribution(s.lr[0], s.lr[1]),
            "weight_decay": FloatDistribution(*s.weight_decay),
        }
        study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(
                n_startup_trials=s.startup, seed=_seed_of("tpe", s.seed, cell, len(search))
            ),
        )
        for r in ended:
            params = {"lr": r["lr"], "weight_decay": r["weight_decay"]}
            if r["status"] == "finished":
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(r["score"])))
            else:  # cut by successive halving: its scores at the rungs it reached, as Optuna's pruned trials
                steps = {int(k): float(v) for k, v in r["rungs"].items() if not math.isnan(float(v))}
                study.add_trial(
                    optuna.trial.create_trial(
                        params=params,
                        distributions=dists,
                        state=optuna.trial.TrialState.PRUNED,
                        intermediate_values=steps or {0: float(r["score"])},
                    )
                )
        trial = study.ask(dists)
        return {"lr": float(trial.params["lr"]), "weight_decay": float(trial.params["weight_decay"])}

    def search_done(self, cell: str) -> bool:
        """Every search trial of the cell was suggested and has ended."""
        search = self._of(cell, "search")
        return len(search) >= self.settings.num_samples and all(r["status"] != "running" for _, r in search)

    def best(self, cell: str) -> dict | None:
        """The cell's chosen search trial: by validation score, a trial that ran its whole budget before
        one ASHA cut short; None while none has a score."""
        pool = [
            r
            for _, r in self._of(cell, "search")
            if r["status"] in ("finished", "stopped_early")
            and r.get("score") is not None
            and not math.isnan(r["score"])
        ]
        if not pool:
            return None
        return max(pool, key=lambda r: (r["status"] == "finished", r["score"]))

    def seed_jobs(self, cell: str) -> list[dict]:
        """The seed re-runs the cell needs at its current best hyper-parameters and has not started."""
        best = self.best(cell)
        if best is None or not self.search_done(cell):
            return []
        # every seed re-run started, errored ones included: --resume retries those in place (the same trial),
        # so a (seed, hyper-parameters) never runs twice
        have = {(r["seed"], r["lr"], r["weight_decay"]) for _, r in self._of(cell, "seeds")}
        return [
            {
                "cell": cell,
                "seed": s,
                "lr": best["lr"],
                "weight_decay": best["weight_decay"],
                "phase": "seeds",
                "candidate": best.get("candidate", -1),
            }
            for s in self.settings.seeds[1:]
            if (s, best["lr"], best["weight_decay"]) not in have
        ]

    # ------------------------------------------------------------------ driving it
    def next_trial(self, trial_id: str, ready=lambda cell: True):
        """A trial's config ({cell, phase, seed, candidate, lr, weight_decay}), None when nothing can
        start now (max_concurrent trials running, inputs pending, or a cell's search still running), or
        FINISHED when nothing is left that this run can start: cells whose search trials all errored
        wait for a rerun (--resume)."""
        n = len(self.cells)
        if self.settings.max_concurrent and len(self._live) >= self.settings.max_concurrent:
            return None
        waiting = False
        for _ in range(n):
            cell = self.cells[self.cursor % n]
            self.cursor += 1
            search = self._of(cell, "search")
            if len(search) < self.settings.num_samples:
                if not ready(cell):
                    waiting = True
                    continue
                job = {
                    "cell": cell,
                    "phase": "search",
                    "seed": self.settings.seeds[0],
                    "candidate": len(search),
                    **self._propose(cell),
                }
            else:
                jobs = self.seed_jobs(cell)
                if not jobs:
                    if any(r["status"] == "running" for _, r in self._of(cell)):
                        waiting = True
                    continue
                job = jobs[0]
            self._put(trial_id, {**job, "status": "running", "score": None, "rungs": {}})
            return dict(job)
        return None if waiting else FINISHED

    def add(self, trial_id: str, job: dict) -> None:
        """Record a trial started outside next_trial (a follow-up seeds round)."""
        self._put(trial_id, {**job, "status": "running", "score": None, "rungs": {}})

    def resumed(self, trial_id: str) -> None:
        """A trial restarted after an error (Tune's resume_errored): running again."""
        if trial_id in self.records:
            self._status(trial_id, "running")

    def observe(self, trial_id: str, iteration: int, score: float) -> bool:
        """A trial's evaluation `iteration` (1-based) scored `score` on validation. Returns True when
        asynchronous successive halving cuts the trial here (search trials only)."""
        r = self.records.get(trial_id)
        if r is None:
            return False
        r["score"] = float(score)
        if r["phase"] != "search":
            return False
        s = self.settings
        # Tune's _Bracket.on_result (ray/tune/schedulers/async_hyperband.py, stop_last_trials=True): the
        # highest rung this trial reached and has no score at decides, against the quantile of the
        # scores recorded there (none: continue); then its score is recorded there. A rung a restarted
        # trial reaches again is not decided twice.
        n_rungs = (
            int(math.log(s.max_t / s.grace_period) / math.log(s.reduction_factor) + 1)
            if s.max_t >= s.grace_period
            else 0
        )
        for m in (s.grace_period * s.reduction_factor**k for k in reversed(range(n_rungs))):
            if iteration < m or str(m) in r["rungs"]:
                continue
            recorded = [o["rungs"][str(m)] for _, o in self._of(r["cell"], "search") if str(m) in o["rungs"]]
            r["rungs"][str(m)] = float(score)
            if recorded:
                import numpy as np

                return bool(float(score) < float(np.nanpercentile(recorded, (1 - 1 / s.reduction_factor) * 100)))
            return False
        return False

    def complete(self, trial_id: str, status: str, score: float | None = None) -> None:
        """A trial ended: finished, stopped_early (cut by ASHA) or error."""
        r = self.records.get(trial_id)
        if r is None:
            return
        self._status(trial_id, status)
        if score is not None and not (isinstance(score, float) and math.isnan(score)):
            r["score"] = float(score)

    # ------------------------------------------------------------------ where the sweep stands
    def superseded(self, trial_id: str) -> bool:
        """A seeds trial at hyper-parameters its cell no longer chooses (its best changed on a resume)."""
        r = self.records[trial_id]
        if r["phase"] != "seeds":
            return False
        best = self.best(r["cell"])
        return best is None or (r["lr"], r["weight_decay"]) != (best["lr"], best["weight_decay"])

    def missing(self) -> list[str]:
        """Cells that are not done: a trial errored for good (a search that lost a candidate is not the
        search the config asked for), no trial finished, or seed re-runs at the current best lacking."""
        out = []
        for cell in self.cells:
            best = self.best(cell)
            live = [(t, r) for t, r in self._of(cell) if not self.superseded(t)]
            seeds = {r["seed"] for _, r in live if r["phase"] == "seeds" and r["status"] == "finished"}
            if (
                best is None
                or not any(r["status"] == "finished" for _, r in live)
                or any(r["status"] == "error" for _, r in live)
                or set(self.settings.seeds[1:]) - seeds
            ):
                out.append(cell)
        return out

    def running(self) -> list[str]:
        return sorted(self._live)
