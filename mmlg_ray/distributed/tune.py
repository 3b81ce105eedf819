"""The trials on Ray Tune: the plan's Searcher and Scheduler, the sweep experiment and its follow-up seeds rounds, restore and its settings check, and the trial rows read back from Tune's results."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from mmlg_ray.config import Config
from mmlg_ray.errors import UserError
from mmlg_ray.engine.job import described_row
from mmlg_ray.engine.results import TrialRow
from mmlg_ray.engine.search import FINISHED, METRIC
from mmlg_ray import storage as stor
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from mmlg_ray import stopping
from mmlg_ray.distributed import syncing
from mmlg_ray.distributed.checkpoints import CheckpointPruner, drop_finished
from mmlg_ray.distributed.logs import status_reporter, tune_callbacks
from mmlg_ray.distributed.pretraining import RESTART_KINDS, PretrainingWatch
from mmlg_ray.distributed.settings import trial_resources
from mmlg_ray.distributed.trial import EVAL_KEYS, trial_fn

log = logging.getLogger("mmlg_ray")


MODE = "max"


# the Tune settings a restored experiment keeps from its first run (Tuner.restore reuses them)
BAKED = (
    "ray.max_failures",
    "ray.tune.max_concurrent",
    "ray.tune.status_every_s",
    "ray.tune.tensorboard",
    "ray.tune.mlflow",
    "ray.tune.trial_cpus",
    "ray.tune.trial_gpus",
    "ray.tune.trial_resources",
)


# --------------------------------------------------------------------------- search and scheduling
_LIVE: dict = {}  # experiment name -> its PlanSearcher in this (the driver's) process


# Module-level classes: Tune pickles both into the experiment (tuner.pkl), and a class pickled by
# reference keeps this module's globals (a class made in a function would be pickled by value, with
# a private copy of _LIVE, and a restored searcher would register where nobody looks).
class PlanSearcher(Searcher):
    """Tune's side of the core SweepPlan: suggest() asks the plan for the next trial, completions go
    back to it; its checkpoint is the plan's records (JSON)."""

    def __init__(self, plan, name: str):
        super().__init__(metric=METRIC, mode=MODE)
        self.plan, self.name = plan, name
        _LIVE[name] = self

    def suggest(self, trial_id):
        job = self.plan.next_trial(trial_id, ready=_ready)
        if job == FINISHED:
            return Searcher.FINISHED
        return job

    def on_trial_complete(self, trial_id, result=None, error=False):
        if error:
            self.plan.complete(trial_id, "error")
            return
        result = result or {}
        status = "finished" if result.get("final_report") else "stopped_early"
        self.plan.complete(trial_id, status, result.get(METRIC))

    def save(self, checkpoint_path):
        Path(checkpoint_path).write_text(json.dumps(self.plan.state()))

    def restore(self, checkpoint_path):
        self.plan.load_state(json.loads(Path(checkpoint_path).read_text()))
        _LIVE[self.name] = self
        log.info(
            "sweep: restored the plan of %d trials (%d running when it stopped)",
            len(self.plan.records),
            len(self.plan.running()),
        )


_RESTARTS: dict = {}  # experiment name -> {trial id: {"preemptions": n, "retries": n, "lost_device_s": s}} (driver)


class RestartCounter(Callback):
    """Each trial's restarts, by cause, as Tune itself tells them apart: a trial's error adds to its
    `run_metadata.num_failures` (what FailureConfig.max_failures bounds), except a RayActorError whose
    node was drained as preempted (ray/tune/experiment/trial.py, _handle_ray_actor_error; the spot
    watcher drains a spot node on AWS's notice). A recovery that left num_failures where it was at the
    trial's start (or last result) is a preemption; one that added to it, a retry.

    And the work each loss threw away, which was paid for: the seconds from the trial's start or last
    result (each result comes with a checkpoint, where the restart resumes) to the error Tune handled,
    times the trial's devices (`lost_device_s`; an error for good counts too). Sweep trials keep these in
    the plan's record (saved with the searcher: a resumed run keeps those saved before the driver
    stopped), a follow-up seeds round's only in this driver's _RESTARTS (a resumed round's rows count
    its restarts since the resume). Not counted: restarts inside a multi-worker trial's own Train run;
    and an actor preempted while Tune restored it from a checkpoint, which Tune counts as a failure."""

    devices, clock = 1, time.time  # also for a counter pickled (tuner.pkl) before they existed

    def __init__(self, name: str, devices: int = 1, clock=time.time):
        self.name, self.devices, self.clock = name, devices, clock
        self._at_start: dict[str, int] = {}
        self._since: dict[str, float] = {}  # trial id -> when it last started or reported

    def __setstate__(self, state: dict):  # Tune's restore unpickles the callbacks without __init__
        self.__dict__.update(state)
        self.__dict__.setdefault("_at_start", {})
        self.__dict__.setdefault("_since", {})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._at_start[trial.trial_id] = trial.run_metadata.num_failures
        self._since[trial.trial_id] = self.clock()

    def on_trial_result(self, iteration, trials, trial, result, **info):  # its count as of its latest report too
        self._at_start[trial.trial_id] = trial.run_metadata.num_failures
        self._since[trial.trial_id] = self.clock()

    def _counts(self, trial) -> tuple[dict, dict | None]:
        counts = _RESTARTS.setdefault(self.name, {}).setdefault(
            trial.trial_id, {**dict.fromkeys(RESTART_KINDS, 0), "lost_device_s": 0.0}
        )
        live = _LIVE.get(self.name)
        return counts, live.plan.records.get(trial.trial_id) if live is not None else None

    def _lost(self, trial) -> float:
        """Charge the work since the trial's start or last result; returns its device-seconds."""
        since = self._since.pop(trial.trial_id, None)
        lost = max(0.0, self.clock() - since) * self.devices if since is not None else 0.0
        counts, rec = self._counts(trial)
        counts["lost_device_s"] += lost
        if rec is not None:
            rec["lost_device_s"] = rec.get("lost_device_s", 0.0) + lost
        return lost

    def on_trial_recover(self, iteration, trials, trial, **info):
        now = trial.run_metadata.num_failures
        before = self._at_start.get(trial.trial_id, now - 1 if now else 0)
        kind = "retries" if now > before else "preemptions"
        self._at_start[trial.trial_id] = now
        lost = self._lost(trial)
        counts, rec = self._counts(trial)
        counts[kind] += 1
        if rec is not None:
            rec[kind] = rec.get(kind, 0) + 1
        cause = "a preemption" if kind == "preemptions" else "a failure"
        log.warning(
            "trial %s: restarted after %s, %.0f device-s lost (so far: %s)", trial.trial_id, cause, lost, counts
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        self._lost(trial)


class PlanScheduler(FIFOScheduler):
    """Asynchronous successive halving per grid cell, decided by the plan (whose rungs are its records:
    a restored run keeps them); a trial restarted by --resume is running again."""

    def __init__(self, name: str, max_t: int):
        super().__init__()
        self.name, self.max_t = name, max_t

    def _plan(self):
        return _LIVE[self.name].plan

    def on_trial_add(self, tc, trial):
        if trial.status == Trial.PENDING and self.name in _LIVE:
            self._plan().resumed(trial.trial_id)

    def on_trial_result(self, tc, trial, result):
        if METRIC not in result or result.get("final_report") or self.name not in _LIVE:
            return TrialScheduler.CONTINUE
        # the trial's own evaluation count, not Tune's training_iteration: a trial restored from a superseded
        # checkpoint resumes from a newer one than Tune's state knows (see .checkpoints)
        evals = int(result.get("epoch") or result.get("training_iteration", 0))
        stop = self._plan().observe(trial.trial_id, evals, result[METRIC])
        return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE

    def debug_string(self):
        return f"asynchronous successive halving per cell (max {self.max_t} evaluations)"


_PRETRAINING: dict = {"watch": None}


def _ready(cell_key: str) -> bool:
    """A cell's inputs exist: its pre-trained shape is written (cells of other methods: always)."""
    w = _PRETRAINING["watch"]
    if w is None:
        return True
    name = w.cells.get(cell_key)
    return name is None or w.ready(name)


def _digest(jobs: list[dict]) -> str:
    return hashlib.sha256(json.dumps(jobs, sort_keys=True).encode()).hexdigest()[:10]


def _tuner(cfg, name, storage, od, trainable, phase, **kw):
    from ray import tune
    from ray.tune import RunConfig, Tuner

    # a trial lost with its worker (preempted node, killed process) is retried up to ray.max_failures
    # times from its latest checkpoint (each evaluation's; one full one kept per trial)
    return Tuner(
        trainable,
        run_config=RunConfig(
            storage_path=storage,
            name=name,
            verbose=1,
            progress_reporter=status_reporter(cfg, phase),
            callbacks=tune_callbacks(cfg, od.target, phase)
            + [CheckpointPruner(), RestartCounter(name, max(1, cfg.ray.tune.trial_workers))],
            # num_to_keep=None: Tune deletes no checkpoint and forces no experiment sync per checkpoint
            # (it saves its state on its own period); CheckpointPruner keeps one full checkpoint per
            # trial, and a state older than its trial resumes from the newest (see .checkpoints)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
        ),
        **kw,
    )


# An experiment saved by an earlier version pickled its plan (and the like) under the modules' old
# homes, before mmlg_ray was split into packages; a restore finds them there.
OLD_HOMES = {
    "mmlg_ray.ancestor": "mmlg_ray.method.ancestor",
    "mmlg_ray.archcheck": "mmlg_ray.method.archcheck",
    "mmlg_ray.descend": "mmlg_ray.method.descend",
    "mmlg_ray.evaluate": "mmlg_ray.method.evaluate",
    "mmlg_ray.finetune": "mmlg_ray.method.finetune",
    "mmlg_ray.learngene": "mmlg_ray.method.learngene",
    "mmlg_ray.models": "mmlg_ray.method.models",
    "mmlg_ray.precision": "mmlg_ray.method.precision",
    "mmlg_ray.pretrain": "mmlg_ray.method.pretrain",
    "mmlg_ray.select": "mmlg_ray.method.select",
    "mmlg_ray.spec": "mmlg_ray.method.spec",
    "mmlg_ray.train": "mmlg_ray.method.train",
    "mmlg_ray.shards": "mmlg_ray.data.shards",
    "mmlg_ray.render": "mmlg_ray.report.render",
    "mmlg_ray.stats": "mmlg_ray.report.stats",
    "mmlg_ray.job": "mmlg_ray.engine.job",
    "mmlg_ray.pipeline": "mmlg_ray.engine.pipeline",
    "mmlg_ray.search": "mmlg_ray.engine.search",
    "mmlg_ray.arms": "mmlg_ray.engine.arms",
    "mmlg_ray.results": "mmlg_ray.engine.results",
    "mmlg_ray.artifacts": "mmlg_ray.engine.artifacts",
    "mmlg_ray.plan": "mmlg_ray.engine.plan",
    "mmlg_ray.stagelog": "mmlg_ray.engine.stagelog",
    "mmlg_ray.preflight": "mmlg_ray.engine.preflight",
    "mmlg_ray.rehearsal": "mmlg_ray.engine.rehearsal",
}


def old_module_homes() -> None:
    import importlib
    import sys

    for old, new in OLD_HOMES.items():
        sys.modules.setdefault(old, importlib.import_module(new))


def _restore(path, trainable):
    from ray.tune import Tuner

    old_module_homes()

    return Tuner.restore(path, trainable=trainable, resume_errored=True, resume_unfinished=True)


def run_tune(cfg, plan, ctx, pretraining, fp, storage, od) -> list[dict]:
    """The trials of `plan` on Ray Tune: the sweep experiment, then any follow-up seeds round."""
    from ray import tune

    tcfg = cfg.ray.tune
    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), trial_resources(tcfg))
    # uploads that grow linearly with the trials: changed files only, the state on a period that grows
    # with the planned trial count (see .syncing)
    syncing.incremental_uploads()
    with syncing.state_period_set(len(plan.cells) * (plan.settings.num_samples + len(plan.settings.seeds) - 1)):
        return _run_tune(cfg, plan, ctx, pretraining, fp, storage, od, trainable)


def _run_tune(cfg, plan, ctx, pretraining, fp, storage, od, trainable) -> list[dict]:
    from ray.tune import TuneConfig

    name = f"sweep-{fp}"
    path = f"{storage}/{name}"
    plan_searcher = PlanSearcher(plan, name)
    _PRETRAINING["watch"] = pretraining if isinstance(pretraining, PretrainingWatch) else None
    try:
        if _restorable(path):
            log.info("sweep: resuming %s", path)
            tuner = _restore(path, trainable)
        else:
            write_baked(cfg, storage, fp)  # the settings this experiment's restores will keep
            # num_samples=-1: no count of Tune's own ends the run (a restore keeps such a count, and a trial
            # retried in place would not fit it): the plan's FINISHED does
            tuner = _tuner(
                cfg,
                name,
                storage,
                od,
                trainable,
                "sweep",
                tune_config=TuneConfig(
                    search_alg=plan_searcher,
                    scheduler=PlanScheduler(name, plan.settings.max_t),
                    num_samples=-1,
                    reuse_actors=True,
                ),
            )  # the plan bounds concurrency: Tune's ConcurrencyLimiter would drop the
            # completion of a trial retried on resume (it is not among its live trials), and the plan with it
        with stopping.tune_run():  # SIGTERM: Tune's graceful stop
            grid = tuner.fit()
        live = _LIVE.get(name)
        if live is not None and live.plan is not plan:  # a restored run drives its own copy of the plan
            plan.load_state(live.plan.state())
        rows = _rows(grid, plan, name)
    finally:
        _PRETRAINING["watch"] = None
        _LIVE.pop(name, None)
    if plan.running():
        return rows  # interrupted: the job says so and writes nothing
    drop_finished(grid)  # the experiment's final state is saved: no restore reads a finished trial's
    # follow-up seeds rounds: earlier ones first (restored: continued, or read back), then a new one
    index = f"{storage}/rounds-{fp}.json"
    rounds = json.loads(stor.read_text(index)) if stor.exists(index) else []
    for r in rounds:
        rows += _round(cfg, plan, f"{storage}/{r['name']}", trainable, r["jobs"], restore=True, od=od, storage=storage)
    jobs = [j for c in plan.cells for j in plan.seed_jobs(c)]
    if jobs and not plan.running():
        r = {"name": f"seeds-{fp}-{_digest(jobs)}", "jobs": jobs}
        rounds.append(r)
        with stor.writing(index) as tmp:
            Path(tmp).write_text(json.dumps(rounds, indent=1))
        rows += _round(cfg, plan, f"{storage}/{r['name']}", trainable, jobs, restore=False, od=od, storage=storage)
    return rows


def _round(cfg, plan, path, trainable, jobs, restore, od, storage) -> list[TrialRow]:
    from ray import tune
    from ray.tune import TuneConfig
    from mmlg_ray.engine.stagelog import Stage

    name = path.rstrip("/").rsplit("/", 1)[-1]
    if restore and _restorable(path):
        tuner = _restore(path, trainable)
    else:
        tuner = _tuner(
            cfg,
            name,
            storage,
            od,
            trainable,
            "seeds",
            param_space={"job": tune.grid_search(jobs)},
            tune_config=TuneConfig(max_concurrent_trials=cfg.ray.tune.max_concurrent, reuse_actors=True),
        )
    st = Stage("seeds", f"{len(jobs)} seed re-runs at their cells' current best hyper-parameters ({name})")
    with stopping.tune_run():
        grid = tuner.fit()
    out = []
    for row in _rows(grid, None, name):
        plan.add(
            row.trial_id,
            {"cell": row.cell, "phase": "seeds", "seed": row.seed, "lr": row.lr, "weight_decay": row.weight_decay},
        )
        if row.status != "running":
            plan.complete(row.trial_id, row.status, row.val_score)
        out.append(row)
    if not any(r.status == "running" for r in out):
        drop_finished(grid)
    st.done(f"{len(out)} trials")
    return out


def check_baked(cfg: Config, storage: str, fp: str) -> None:
    """A restored Tune run keeps the settings of its first run (Tuner.restore reuses them; a restored
    trial keeps its resources): refuse a resume that changes one, naming it, rather than record
    settings that do not hold. Run before anything is written."""
    from mmlg_ray.config import dig

    path = f"{storage}/settings-{fp}.json"
    if not stor.exists(path):
        return
    now = {k: dig(cfg.model_dump(mode="json"), k) for k in BAKED}
    was = json.loads(stor.read_text(path))
    changed = [k for k in BAKED if k in was and was[k] != now[k]]
    if changed:
        k = changed[0]
        raise UserError(
            k,
            f"changed from {was[k]!r} to {now[k]!r} since the interrupted run, whose restored Tune "
            f"experiment keeps its first run's value ({', '.join(changed)} changed)",
            f"set {k}={json.dumps(was[k])} to resume, or start over with --fresh",
        )


def write_baked(cfg: Config, storage: str, fp: str) -> None:
    from mmlg_ray.config import dig

    with stor.writing(f"{storage}/settings-{fp}.json") as tmp:
        Path(tmp).write_text(json.dumps({k: dig(cfg.model_dump(mode="json"), k) for k in BAKED}, indent=1))


def _restorable(path: str) -> bool:
    """A Tune experiment that can really be restored: its tuner file *and* an experiment state. A
    driver killed while a phase was starting leaves the first without the second; restoring that
    would start trials without their configs, so such a phase is started anew (none of its trials
    had finished)."""
    from ray.tune import Tuner

    if not Tuner.can_restore(path):
        return False
    files = stor.list_files(path, recursive=False)
    return any(f.startswith("experiment_state-") for f in files) and (
        not path.rstrip("/").rsplit("/", 1)[-1].startswith("sweep-")  # the sweep: its searcher's records too
        or any(f.startswith("searcher-state-") for f in files)
    )


def previous_state(storage: str, fp: str) -> list[str]:
    """This experiment's Tune state under the storage path (what --fresh removes, with the settings
    file); none while no Tune experiment of it was started."""
    names = [f"sweep-{fp}", f"rounds-{fp}.json"]
    index = f"{storage}/rounds-{fp}.json"
    if stor.exists(index):
        names += [r["name"] for r in json.loads(stor.read_text(index))]
    found = [f"{storage}/{n}" for n in names if stor.exists(f"{storage}/{n}")]
    settings = f"{storage}/settings-{fp}.json"
    return found + [settings] if found and stor.exists(settings) else found


def _error_line(err) -> str:
    """The first line of a trial's error, its root cause rather than Ray's wrapper."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or getattr(err, "__cause__", None)
        if inner is None or inner is err:
            break
        err = inner
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    return f"{type(err).__name__}: {text}"[:300]


# what Tune adds to every report (ray/tune/result.py's auto-filled keys): not columns of ours
TUNE_KEYS = (
    "training_iteration",
    "time_this_iter_s",
    "time_total_s",
    "timestamp",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "checkpoint_dir_name",
    "done",
    "date",
    "experiment_tag",
    "should_checkpoint",
    "checkpoint_path",
    "trial_id",
    "experiment_id",
)


def _rows(result_grid, plan, name: str = "") -> list[TrialRow]:
    """One row per trial from a Tune ResultGrid (its stored state, so resumed runs count once), with
    its `status`: finished, stopped_early (cut by ASHA), error (and the error's first line), or
    running (interrupted; never written). A trial that errored before its first report still has
    its row (its cell, seed and hyper-parameters, no scores). `plan`: the sweep's, whose records
    say which trials ended (a follow-up round's trials: from their results)."""
    rows = []
    for res in result_grid:
        m = dict(res.metrics or {})
        cfg = res.config or {}
        if "job" in cfg:
            cfg = {**cfg, **cfg["job"]}
        if "cell" not in cfg:
            continue
        # Tune's trial folder is <trainable>_<trial id>_<tag>_<date> (ray/tune/experiment/trial.py)
        folder = res.path.rstrip("/").rsplit("/", 1)[-1]
        trial_id = str(m.get("trial_id") or folder.removeprefix("trial_fn_").split("_", 1)[0])
        status = "error" if res.error is not None else ("finished" if m.get("final_report") else "stopped_early")
        rec = plan.records.get(trial_id) if plan is not None else None
        if (
            status != "error"
            and not m.get("final_report")
            and ((rec is not None and rec["status"] == "running") or (plan is None))
        ):
            status = "running"  # neither finished, errored nor cut: interrupted
        if not m.get("trial"):  # no report at all: describe it from its config
            m = {**m, **described_row(cfg["cell"], cfg).record()}
        hist = json.loads(m["history_json"]) if "history_json" in m else _history_from_df(res)
        row = {
            k: v
            for k, v in m.items()
            if k not in ("history_json", "final_report", "config") and not isinstance(v, dict)
        }
        if status != "finished":  # cut by ASHA or errored: its last report carries the description and cost so far
            for k in list(m):
                if k in EVAL_KEYS - {"step", "epoch"} or k.startswith(("i2t_", "t2i_")):
                    row[f"final_{k}"] = float(m[k])
            best = {}
            for h in hist:  # chosen on validation
                if not best or h.get("val_score", -1) > best.get("val_score", -1):
                    best = h
            for k, v in best.items():
                if k not in ("epoch", "train_loss", "linear_probe_init"):
                    row[f"best_{k}"] = float(v)
            row["epochs"] = len(hist)
        row["phase"] = cfg["phase"]
        if not row.get("ended_at", 0) > 0 and m.get("timestamp"):  # cut short or errored: its last report's time
            row["ended_at"] = float(m["timestamp"])
        row["candidate"] = int(cfg.get("candidate", -1))  # a shape's common candidate (search), the chosen one (seeds)
        row["status"] = status
        row["error"] = _error_line(res.error) if res.error is not None else ""
        row["stopped_early"] = status == "stopped_early"
        row["trial_id"] = trial_id
        row["trial"] = f"{row['trial']}-{trial_id}"
        row["cell"] = cfg["cell"]
        for k in [k for k in row if k in EVAL_KEYS or k.startswith(("i2t_", "t2i_"))]:
            row.pop(k)
        for k in [k for k in row if k in TUNE_KEYS]:
            row.pop(k, None)
        row["val_score"] = float(m.get("val_score", float("nan")))
        restarts = rec if rec is not None else _RESTARTS.get(name, {}).get(trial_id, {})
        for k in RESTART_KINDS:
            row[k] = int(restarts.get(k, 0))
        row["lost_device_s"] = float(restarts.get("lost_device_s", 0.0))
        rows.append(TrialRow.of(row, strict=False, trial_id=trial_id, history=hist))
    return rows


def _history_from_df(res) -> list[dict]:
    """A trial's evaluations from its stored results, one per step: a retried trial re-reports the
    steps after its checkpoint, and only the last report of each step is kept."""
    df = res.metrics_dataframe
    if df is None or not len(df) or "step" not in df.columns:
        return []
    keep = [c for c in df.columns if c in EVAL_KEYS or c.startswith(("i2t_", "t2i_"))]
    df = df[keep].dropna(subset=["step"]).drop_duplicates(subset="step", keep="last").sort_values("step")
    return df.to_dict("records")
