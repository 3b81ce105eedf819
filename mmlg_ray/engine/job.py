"""The main job's stage sequence and its bookkeeping, written once (no Ray):

  ancestor     the local default pre-trained once and cached; clusters: an open_clip tag or a file
  extraction   one learngene per learngene method and extraction mode in the grid
  pretrain     pt_ft / csm: each descendant shape pre-trained on the corpus (their cost is what the
               report compares against); each shape written as soon as it is done
  trials       the search of every grid cell (mmlg_ray.engine.search), its seed re-runs
  tables       trials.parquet, history.parquet, stages.parquet, experiment.json; then the report

An executor runs the stages: `LocalExecutor` (here) in this process, one trial after another;
`mmlg_ray.distributed.sweep.RayExecutor` on Ray Train (extraction), Ray tasks (pre-training) and
Ray Tune (trials). Every artifact is written to the output store and handed on by reference
(URI + content hash, mmlg_ray.engine.artifacts): a trial reads only what its cell needs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from mmlg_ray.engine import artifacts as art
from mmlg_ray.engine.arms import Cell
from mmlg_ray.config import SELECTION_METHODS, Config, ModelSpec
from mmlg_ray.errors import JobFailed, UserError
from mmlg_ray.engine.results import TrialRow

# the pre-training stage's units (mmlg_ray.engine.pretraining), also under their names here
from mmlg_ray.engine.pretraining import (  # noqa: F401
    PretrainJob,
    pretrain_and_write,
    pretrain_checkpointing,
    pretrain_fingerprint,
    pretrain_jobs,
    split_pretraining,
)
from mmlg_ray.storage import OutputDir

log = logging.getLogger("mmlg_ray")


class PretrainFailed(JobFailed):
    """Some descendant shapes failed to pre-train; the others were written and a rerun reuses them."""


# --------------------------------------------------------------------------- what a trial reads
def trial_context(cfg: Config, anc, anc_ref, learngenes: dict, jobs: list[PretrainJob], storage: str | None) -> dict:
    """Everything a trial needs, by reference only (a few kB whatever the scale)."""
    from mmlg_ray.engine.pipeline import shape_key

    return {
        "cfg": cfg.model_dump(mode="json"),
        "storage": storage,
        "cache_dir": cfg.cache_dir,  # each node's ~
        "ancestor": {
            "spec": anc.spec.model_dump(),
            "fingerprint": anc.fingerprint,
            "source": anc.source,
            "ref": anc_ref.to_json() if anc_ref else None,
        },
        "learngenes": {k: r.to_json() for k, r in learngenes.items()},
        "pretrained": {f"{j.method}|{shape_key(j.spec)}|{j.budget:g}": j.sidecar for j in jobs},
        "kill_trial_at_step": os.environ.get("MMLG_KILL_TRIAL_AT_STEP"),
        "kill_trial_where": json.loads(os.environ.get("MMLG_KILL_TRIAL_WHERE") or "{}"),
    }


def trial_inputs(ctx: dict, cell: Cell):
    """(ancestor, learngenes, pretrained) one cell needs, read by reference through the node-local
    cache: the ancestor's weights only for weight_selection / heur_lg, its own learngene, its own
    pre-trained shape; nothing else."""
    from mmlg_ray.method.ancestor import Ancestor
    from mmlg_ray.method.descend import descendant_spec
    from mmlg_ray.method.learngene import load_learngene
    from mmlg_ray.engine.pipeline import shape_key
    from safetensors.torch import load_file

    a, cache = ctx["ancestor"], ctx["cache_dir"]
    spec = ModelSpec(**a["spec"])
    state = {}
    if cell.method in SELECTION_METHODS:
        if not a.get("ref"):
            raise RuntimeError(f"{cell.method} needs the ancestor's weights and the sweep wrote none")
        state = art.load(a["ref"], "ancestor", lambda p: load_file(str(p)), cache)
    anc = Ancestor(spec, state, a["fingerprint"], a["source"])
    lk = cell.learngene_key
    learngenes = (
        {lk: art.load(ctx["learngenes"][lk], "learngene", load_learngene, cache)} if lk in ctx["learngenes"] else {}
    )
    pretrained = {}
    if cell.pretrained_key:
        key = (cell.method, shape_key(descendant_spec(spec, cell.depth, cell.width)), cell.pt_budget)
        side_uri = ctx["pretrained"][f"{key[0]}|{key[1]}|{key[2]:g}"]
        side = art.read_sidecar(side_uri)
        if side is None:
            raise RuntimeError(
                f"the pre-trained shape {key[0]}/{key[1]}@{key[2]:g}x is not written (its "
                "pre-training failed; see the job's log); rerun with --resume"
            )
        pretrained[key] = (art.load(side["ref"], "pretrained", lambda p: load_file(str(p)), cache), side["cost"])
    return anc, learngenes, pretrained


# --------------------------------------------------------------------------- the executors' interface
class Executor:
    """Runs the stages; the job below owns their order and bookkeeping."""

    name = "local"

    def check(self, cfg: Config, od: OutputDir) -> None:
        """Refuse bad settings of this executor before anything is written or started."""

    def check_resume(self, cfg: Config, storage: str | None, fp: str) -> None:
        """Refuse a --resume whose settings the earlier run's state cannot take, before anything is written."""

    def storage(self, cfg: Config, od: OutputDir) -> str | None:
        """Where this executor keeps its resumable state (None: it keeps none)."""
        return None

    def previous_state(self, storage: str | None, fp: str) -> list[str]:
        """This experiment's resumable state from an earlier run (what --fresh removes)."""
        return []

    def open(self, cfg: Config, od: OutputDir, storage: str | None, resume: bool) -> None: ...

    def extract(self, cfg: Config, anc, uri: str, method: str, mode: str, storage: str | None) -> None:
        raise NotImplementedError

    def start_pretraining(self, cfg: Config, anc, anc_ref, jobs: list[PretrainJob], wait: bool):
        """Start the missing shapes; returns a handle with .ready(name) and .wait() -> (done, failed)."""
        raise NotImplementedError

    def run_trials(
        self, cfg: Config, plan, ctx: dict, pretraining, fp: str, storage: str | None, od: OutputDir
    ) -> list[dict]:
        raise NotImplementedError


class _Done:
    """Pre-training that ran to its end before the trials (the local executor; a resumed Ray run)."""

    def __init__(self, done: dict, failed: list):
        self.done, self.failed = done, failed

    def ready(self, name: str) -> bool:
        return True

    def wait(self):
        return self.done, self.failed


class LocalExecutor(Executor):
    """Every stage in this process, one after another; no early stopping (each trial runs its budget)."""

    def __init__(self):
        from mmlg_ray.method.train import resolve_device

        self.device = None
        self._resolve = resolve_device

    def open(self, cfg, od, storage, resume):
        self.device = self._resolve(cfg.device)

    def extract(self, cfg, anc, uri, method, mode, storage):
        from mmlg_ray import storage as stor
        from mmlg_ray.engine.pipeline import extract

        with stor.writing(uri) as tmp:
            extract(cfg, anc, tmp, method=method, device=self.device, mode=mode)

    def start_pretraining(self, cfg, anc, anc_ref, jobs, wait):
        done, failed = {}, []
        for j in jobs:
            try:
                done[j.name] = pretrain_and_write(
                    cfg, anc, j, self.device, hold_s=float(os.environ.get("MMLG_HOLD_PRETRAIN_S") or 0)
                )
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 (the others still run; one error names them all)
                log.error("pretrain %s failed: %s", j.name, str(e).strip().splitlines()[-1])
                failed.append((j.name, e))
        return _Done(done, failed)

    def run_trials(self, cfg, plan, ctx, pretraining, fp, storage, od):
        from mmlg_ray.method.finetune import load_task_data
        from mmlg_ray.engine.pipeline import run_trial, shape_key  # noqa: F401
        from mmlg_ray.engine.search import FINISHED

        rows, data_cache, n = [], {}, 0
        while True:
            tid = f"local{n:05d}"
            job = plan.next_trial(tid)
            if job is None or job == FINISHED:
                break
            n += 1
            cell = Cell.of(job["cell"])
            anc, lgs, pre = trial_inputs(ctx, cell)
            from mmlg_ray.method.descend import descendant_spec

            spec = descendant_spec(anc.spec, cell.depth, cell.width)
            if cell.modality not in data_cache:
                data_cache[cell.modality] = load_task_data(cfg, cell.modality, spec.image_size)
            log.info(
                "trial %s seed %d (%s) lr %.2g wd %.2g",
                cell.tag,
                job["seed"],
                job["phase"],
                job["lr"],
                job["weight_decay"],
            )
            try:
                row = run_trial(
                    cfg,
                    cell,
                    int(job["seed"]),
                    lr=job["lr"],
                    weight_decay=job["weight_decay"],
                    ancestor=anc,
                    learngenes=lgs,
                    pretrained=pre,
                    task_data=data_cache[cell.modality],
                    device=self.device,
                )
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 (recorded as the trial's error, as Tune records it)
                log.error("trial %s failed: %s", cell.tag, e)
                plan.complete(tid, "error")
                rows.append(error_row(job, tid, e))
                continue
            plan.complete(tid, "finished", row.val_score)
            rows.append(
                row.with_(
                    phase=job["phase"],
                    candidate=job.get("candidate", -1),
                    status="finished",
                    error="",
                    trial_id=tid,
                    cell=job["cell"],
                    trial=f"{row.trial}-{tid}",
                )
            )
        return rows


def described_row(cell_key: str, job: dict, **kw) -> TrialRow:
    """The row of a trial known only by its job (cell, seed, hyper-parameters): one that errored before
    its first report."""
    c = Cell.of(cell_key)
    return TrialRow(
        trial=f"{c.tag}-s{job['seed']}",
        cell=cell_key,
        method=c.method,
        arm=c.arm,
        extraction=c.extraction,
        pt_budget=c.pt_budget,
        modality=c.modality,
        depth=c.depth,
        width=c.width,
        seed=int(job["seed"]),
        lr=float(job["lr"]),
        weight_decay=float(job["weight_decay"]),
        **kw,
    )


def error_row(job: dict, trial_id: str, err) -> TrialRow:
    """The row of a trial that errored before its first report: its cell, seed and hyper-parameters."""
    row = described_row(
        job["cell"],
        job,
        phase=job["phase"],
        status="error",
        candidate=int(job.get("candidate", -1)),
        error=f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300],
        trial_id=trial_id,
    )
    return row.with_(trial=f"{row.trial}-{trial_id}")


# --------------------------------------------------------------------------- the job
def run(cfg: Config, out_dir, executor: Executor, resume: bool = False, storage: str | None = None) -> Path | str:
    """Ancestor -> learngenes -> pre-trained shapes -> trials -> tables -> report, on `executor`.
    Every stage whose artifact the output store holds for the same config is reused. Raises JobFailed
    when a grid cell is left without its results (the tables and the report are written first)."""
    import torch
    from mmlg_ray.method.ancestor import get_ancestor
    from mmlg_ray.engine.arms import arm_name
    from mmlg_ray.atomic import write_json
    from mmlg_ray.method.learngene import load_learngene
    from mmlg_ray.engine.pipeline import _cost_cols, cells, learngene_arms, learngene_name, setup_runtime
    from mmlg_ray.report import build_output_report
    from mmlg_ray.engine.results import write_parquet, write_run_files, write_tables
    from mmlg_ray.engine.search import SearchSettings, SweepPlan
    from mmlg_ray.engine.stagelog import Stage

    setup_runtime(cfg)
    # the driver's own stages (local ancestor pre-training, consolidation) may use every core here;
    # a job's driver inherits OMP_NUM_THREADS=1 from Ray otherwise
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    od = OutputDir(out_dir, cfg.cache_path)
    out = od.local
    out.mkdir(parents=True, exist_ok=True)
    fp = cfg.experiment_fingerprint()
    executor.open(cfg, od, storage, resume)
    t_job = time.perf_counter()
    timeline = []

    def stage(name, detail=""):
        st = Stage(name, detail)
        st.t_start = time.time()
        return st

    def ended(st, detail, kind, what):
        st.done(detail)
        timeline.append({"stage": kind, "name": what, "start": st.t_start, "end": time.time()})

    st = stage("ancestor", cfg.ancestor.source)
    anc = get_ancestor(cfg)
    ended(st, f"fingerprint {anc.fingerprint[:12]}", "ancestor", anc.source)
    stages = [{"stage": "ancestor", "name": anc.source, **_cost_cols(anc.cost)}]
    write_run_files(out, cfg, anc)
    od.push("config.yaml")
    od.push("ancestor.json")

    learngenes = {}
    for method, mode in learngene_arms(cfg):
        key, name = arm_name(method, mode), learngene_name(cfg, method, mode)
        st = stage(f"extraction {key}")
        if od.exists(name):
            log.info("extraction %s: reusing %s", key, od.uri(name))
        else:
            executor.extract(cfg, anc, od.uri(name), method, mode, storage)
        local = od.fetch(name)
        learngenes[key] = art.ref_to(od.uri(name), local)
        lg_cost = load_learngene(local).meta.cost
        ended(st, od.uri(name), "extraction", key)
        stages.append({"stage": "extraction", "name": key, "artifact": od.uri(name), **_cost_cols(lg_cost)})

    grid = cells(cfg)
    anc_ref = None
    if {"weight_selection", "heur_lg", "csm"} & {c.method for c in grid}:
        anc_ref = _ancestor_artifact(anc, od)  # read by those trials / tasks, by reference
    jobs = pretrain_jobs(cfg, anc.spec, od)
    reused, todo = split_pretraining(jobs)
    st_pre = stage("pretrain", f"{len(todo)} pt_ft / csm shapes to pre-train, {len(reused)} reused")
    # a first run starts the trials that need no pre-trained shape while the shapes pre-train; a
    # resumed one finishes pre-training first (its restored trials may need any shape at once)
    pretraining = executor.start_pretraining(cfg, anc, anc_ref, todo, wait=resume)
    ctx = trial_context(cfg, anc, anc_ref, learngenes, jobs, storage)
    del anc  # nothing below reads the ancestor's weights in this process

    plan = SweepPlan(grid, SearchSettings.of(cfg))
    st = stage(
        "trials",
        f"{len(grid)} cells x {cfg.ray.tune.num_samples} search trials + "
        f"{len(cfg.descendants.seeds) - 1} seed re-runs each",
    )
    try:
        rows = executor.run_trials(cfg, plan, ctx, pretraining, fp, storage, od)
    except BaseException:
        getattr(pretraining, "close", lambda: None)()  # no task is waited for: stop watching them
        raise
    st.done(f"{len(rows)} trials")
    running = plan.running()
    if running:  # interrupted (Ctrl-C, a stopped job): nothing is recorded, and no task is waited for
        getattr(pretraining, "close", lambda: None)()
        raise JobFailed(
            f"the sweep was interrupted with {len(running)} trials unfinished; rerun with --resume to " "continue it"
        )
    done, failed = pretraining.wait()
    st_pre.done(f"{len(done)} written, {len(failed)} failed")
    side = {**reused, **done}
    for j in jobs:
        if j.name in side:
            stages.append(
                {"stage": "pretrain", "name": j.name, "artifact": j.weights, **_cost_cols(side[j.name]["cost"])}
            )
    rows = [
        r.with_(status="superseded") if r.trial_id in plan.records and plan.superseded(r.trial_id) else r for r in rows
    ]  # a seed re-run at hyper-parameters its cell no longer chooses
    missing = plan.missing()
    failed_msg = failure_summary(rows, missing, len(grid))
    st = stage("tables")
    write_tables(out, rows, stages)
    write_parquet(timeline_frame(timeline, done, rows), out / "timeline.parquet")
    write_json(
        out / "experiment.json",
        {
            "fingerprint": fp,
            "sections": list(cfg.RESULT_SECTIONS),
            "complete": not missing and not failed,
            "backend": executor.name,
        },
    )
    # trials.parquet last: with experiment.json it marks a finished run
    for name in ("stages.parquet", "history.parquet", "timeline.parquet", "experiment.json", "trials.parquet"):
        od.push(name)
    st.done(str(od))
    if any(r.status in ("finished", "stopped_early") for r in rows):
        st = stage("report")
        build_output_report(od)
        st.done(od.uri("report/report.html"))
        log.info(
            "sweep: %d trials in %.0f s; tables in %s; report %s",
            len(rows),
            time.perf_counter() - t_job,
            od,
            od.uri("report/report.html"),
        )
    else:
        log.warning("sweep: no trial ran to its end; tables in %s, no report", od)
    if failed:
        user = [e for _, e in failed if isinstance(e, UserError)]
        if user:  # bad input (e.g. an unreadable corpus): the usual one line, exit 2
            raise UserError(user[0].field, user[0].message, user[0].fix)
        names = ", ".join(n for n, _ in failed)
        raise PretrainFailed(
            f"pre-training failed for {len(failed)} of {len(todo)} descendant shapes: {names} "
            f"(first error: {str(failed[0][1]).strip().splitlines()[-1]}); the {len(side)} finished shapes "
            f"are in {od.uri('pretrained')} and a rerun with --resume reuses them"
        ) from failed[0][1]
    if failed_msg:
        raise JobFailed(failed_msg)
    return od.target if od.remote else out


def _ancestor_artifact(anc, od: OutputDir) -> art.ArtifactRef:
    """The ancestor's weights in the output store (written once per fingerprint), by reference."""
    from safetensors.torch import save_file

    from mmlg_ray.atomic import atomic_path

    name = f"artifacts/ancestor-{anc.fingerprint[:16]}.safetensors"
    local = od.fetch(name)
    if local is None:
        local = od.path(name)
        with atomic_path(local) as tmp:
            save_file({k: v.contiguous() for k, v in anc.state.items()}, str(tmp))
        od.push(name)
    return art.ref_to(od.uri(name), local)


def failure_summary(rows: list[TrialRow], missing: list[str], n_cells: int) -> str | None:
    """Logs one line on the errored trials; returns the job's failure message when a grid cell is left
    without its results (missing from every comparison), else None."""
    errored = [r for r in rows if r.status == "error"]
    if errored:
        first = {}
        for r in errored:
            first.setdefault(r.cell or r.trial, r.error)
        log.warning(
            "sweep: %d of %d trials errored, in %d cells: %s",
            len(errored),
            len(rows),
            len(first),
            "; ".join(f"{c}: {e}" for c, e in first.items()),
        )
    if missing:
        return (
            f"{len(missing)} of {n_cells} grid cells are incomplete (a trial errored, none finished, or seed "
            f"re-runs are lacking): {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}; trials.parquet "
            "lists each trial's status and error; rerun with --resume to retry the errored trials"
        )
    return None


def timeline_frame(driver: list[dict], pretrained: dict, rows: list[TrialRow]):
    """When each piece of work ran (wall clock, seconds from the job's start): the driver's stages,
    each shape pre-trained in this run, each trial's last attempt. stage, name, start_s, end_s, what
    (the method a trial's cell grows, for the plot's colours)."""
    import pandas as pd

    out = [
        {"stage": d["stage"], "name": d["name"], "start": d["start"], "end": d["end"], "what": d["stage"]}
        for d in driver
    ]
    for name, side in pretrained.items():
        c = side.get("cost") or {}
        if c.get("started_at"):
            out.append(
                {"stage": "pretrain", "name": name, "start": c["started_at"], "end": c["ended_at"], "what": "pretrain"}
            )
    for r in rows:
        if r.started_at > 0 and r.ended_at > 0 and r.status != "superseded":  # NaN: never started
            needs = "needs a pre-trained shape" if r.method in ("pt_ft", "csm") else "needs none"
            out.append(
                {
                    "stage": "trial",
                    "name": r.trial,
                    "start": r.started_at,
                    "end": r.ended_at,
                    "what": f"{r.phase or 'trial'}, {needs}",
                }
            )
    df = pd.DataFrame(out, columns=["stage", "name", "start", "end", "what"])
    if len(df):
        t0 = df.start.min()
        df["start_s"], df["end_s"] = df.start - t0, df.end - t0
    return df
