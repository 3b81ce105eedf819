"""The descendant sweep on Ray Tune, and the whole main job around it.

Stages, each skipped when its artifact exists for the same config:
  ancestor     local default: pre-trained once and cached; clusters: loaded (open_clip tag / file)
  extraction   one learngene per learngene method in the grid (mmlg, tleg), on Ray Train + DeepSpeed
  pretrain     pt_ft / csm: each descendant shape pre-trained on the corpus, as parallel Ray tasks,
               measured (their cost is what the report compares against)
  search       Ray Tune over the grid depth x width x modality x method: within every cell an Optuna
               searcher proposes fine-tuning hyper-parameters (lr, weight decay) and an ASHA scheduler
               of that cell cuts weak trials (scores of different tasks are never compared); first seed.
               Both optimise the validation score (`val_score`), never the test score
  seeds        every cell's best hyper-parameters (by validation) re-run with the other seeds
  tables       trials.parquet, history.parquet, stages.parquet, written atomically

A sweep started again with --resume restores both Tune experiments from the output folder: finished
trials are not run again and each trial appears once in trials.parquet.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import tempfile
import time
from pathlib import Path

from ..config import Config, TuneSettings
from ..errors import JobFailed, UserError
from ..pipeline import (Cell, arm_name, cells, learngene_arms, learngene_name, needs_pretraining, parse_arm,
                        pretrain_name, shape_key)
from ..storage import OutputDir
from .. import storage as stor
from .logs import Stage, check_logging, quiet_worker, status_reporter, train_logging, tune_callbacks
from .settings import check_storage, ensure_ray, pretrain_task_options, storage_uri, trial_resources, trial_worker_resources

log = logging.getLogger("mmlg_ray")
METRIC, MODE = "val_score", "max"  # search and early stopping read validation, never test
EVAL_KEYS = {"score", "top1", "accuracy", "mean_recall", "zeroshot_top1", "step", "epoch", "train_loss", "val_score",
             "val_top1", "val_accuracy", "val_mean_recall"}


# --------------------------------------------------------------------------- per-cell search + scheduling
def _cell_key(config: dict) -> str:
    return config["cell"]


def make_cell_searcher(cfg: Config, cell_tags: list[str], seed0: int, scheduler=None):
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch
    from ray import tune

    space_cfg = cfg.ray.tune.search_space
    n = cfg.ray.tune.num_samples

    class CellSearcher(Searcher):
        """One OptunaSearch per grid cell, `n` suggestions each, round-robin over cells.

        Tune saves a searcher's state with every experiment checkpoint but never a scheduler's; this
        searcher also carries the per-cell ASHA state of `scheduler` (the same object in the Tuner's
        pickled state), so a restored experiment keeps its rungs."""

        def __init__(self):
            super().__init__(metric=METRIC, mode=MODE)
            self.scheduler = scheduler
            self.cells = list(cell_tags)
            self.count = {c: 0 for c in self.cells}
            self.owner: dict[str, str] = {}
            self.subs = {}
            for i, c in enumerate(self.cells):
                space = {"lr": tune.loguniform(*space_cfg.lr), "weight_decay": tune.uniform(*space_cfg.weight_decay)}
                # converted here, as OptunaSearch would (which warns, once per cell, when it has to)
                sub = OptunaSearch(space=OptunaSearch.convert_search_space(space), metric=METRIC, mode=MODE,
                                   seed=(cfg.seed * 1000 + i) % 2 ** 32)
                self.subs[c] = sub
            self.cursor = 0

        def suggest(self, trial_id):
            for _ in range(len(self.cells)):
                c = self.cells[self.cursor % len(self.cells)]
                self.cursor += 1
                if self.count[c] < n:
                    cfg_ = self.subs[c].suggest(trial_id)
                    if cfg_ is None:
                        return None
                    self.count[c] += 1
                    self.owner[trial_id] = c
                    return {**cfg_, "cell": c, "seed": seed0, "phase": "search"}
            return Searcher.FINISHED

        def on_trial_result(self, trial_id, result):
            if trial_id in self.owner:
                self.subs[self.owner[trial_id]].on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id in self.owner:
                self.subs[self.owner[trial_id]].on_trial_complete(trial_id, result, error)

        def save(self, checkpoint_path):
            subs = {}
            for c, s in self.subs.items():
                with tempfile.NamedTemporaryFile(delete=False) as f:
                    tmp = f.name
                s.save(tmp)
                subs[c] = Path(tmp).read_bytes()
                os.unlink(tmp)
            with open(checkpoint_path, "wb") as f:
                pickle.dump({"count": self.count, "owner": self.owner, "cursor": self.cursor, "subs": subs,
                             "asha": pickle.dumps(self.scheduler.by_cell) if self.scheduler is not None else None}, f)

        def restore(self, checkpoint_path):
            with open(checkpoint_path, "rb") as f:
                st = pickle.load(f)
            self.count, self.owner, self.cursor = st["count"], st["owner"], st["cursor"]
            for c, blob in st["subs"].items():
                with tempfile.NamedTemporaryFile(delete=False) as f:
                    f.write(blob)
                self.subs[c].restore(f.name)
                os.unlink(f.name)
            if self.scheduler is not None and st.get("asha"):
                self.scheduler.by_cell = pickle.loads(st["asha"])
                log.info("sweep: restored the ASHA rungs of %d cells", len(self.scheduler.by_cell))

    return CellSearcher()


def make_cell_scheduler(cfg: Config, max_t: int):
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    tcfg = cfg.ray.tune

    class CellASHA(FIFOScheduler):
        """An ASHA scheduler per grid cell: a trial is only ever compared with trials of its cell."""

        def __init__(self):
            super().__init__()
            self.by_cell: dict[str, AsyncHyperBandScheduler] = {}

        def _sched(self, trial):
            c = _cell_key(trial.config)
            if c not in self.by_cell:
                s = AsyncHyperBandScheduler(time_attr="training_iteration", max_t=max_t,
                                            grace_period=min(tcfg.grace_period, max_t),
                                            reduction_factor=tcfg.reduction_factor)
                s.set_search_properties(METRIC, MODE)
                self.by_cell[c] = s
            return self.by_cell[c]

        def set_search_properties(self, metric, mode, **spec):
            return True

        def on_trial_add(self, tc, trial):
            self._sched(trial).on_trial_add(tc, trial)

        def on_trial_result(self, tc, trial, result):
            return self._sched(trial).on_trial_result(tc, trial, result)

        def on_trial_complete(self, tc, trial, result):
            self._sched(trial).on_trial_complete(tc, trial, result)

        def on_trial_remove(self, tc, trial):
            self._sched(trial).on_trial_remove(tc, trial)

        def on_trial_error(self, tc, trial):
            self._sched(trial).on_trial_error(tc, trial)

        def debug_string(self):
            return f"Per-cell ASHA over {len(self.by_cell)} cells (max_t={max_t})"

    return CellASHA()


# --------------------------------------------------------------------------- the trial
_TASK_DATA: dict = {}
_ARTIFACTS: dict = {}  # a reused trial actor keeps the last artifacts it fetched


def _fetch(ref):
    """An artifact from the object store (each was put there once by the driver), cached per actor."""
    import ray
    if not isinstance(ref, ray.ObjectRef):
        return ref
    key = ref.hex()
    if key not in _ARTIFACTS:
        if len(_ARTIFACTS) >= 4:
            _ARTIFACTS.clear()
        _ARTIFACTS[key] = ray.get(ref)
    return _ARTIFACTS[key]


def share_artifacts(anc, learngenes: dict, pretrained: dict) -> dict:
    """Each artifact put into the object store once, by reference: a trial fetches only what its
    cell's method needs (the ancestor's weights only for weight_selection / heur_lg, its own
    learngene, its own pre-trained shape), never one object holding everything."""
    import ray
    from ..ancestor import Ancestor
    light = Ancestor(anc.spec, {}, anc.fingerprint, anc.source, anc.cost)  # spec only
    return {"ancestor_spec": light, "ancestor": ray.put(anc),
            "learngenes": {m: ray.put(lg) for m, lg in learngenes.items()},
            "pretrained": [(k, ray.put(v)) for k, v in pretrained.items()]}


def _artifacts_for(ctx: dict, cell):
    """(ancestor, learngenes, pretrained) for one cell, fetched by reference."""
    from ..descend import descendant_spec
    from ..pipeline import shape_key
    anc = ctx["ancestor_spec"]
    if cell.method in ("weight_selection", "heur_lg"):
        anc = _fetch(ctx["ancestor"])
    lk = cell.learngene_key
    learngenes = {lk: _fetch(ctx["learngenes"][lk])} if lk in ctx["learngenes"] else {}
    key = (cell.method, shape_key(descendant_spec(anc.spec, cell.depth, cell.width)), cell.pt_budget)
    pretrained = {k: _fetch(ref) for k, ref in ctx["pretrained"] if tuple(k) == key}
    return anc, learngenes, pretrained


CKPT_FILE = "finetune.pt"


def _load_checkpoint(ckpt) -> dict | None:
    """A fine-tuning snapshot from a Tune / Train checkpoint (None: start from step 0)."""
    if ckpt is None:
        return None
    import torch
    with ckpt.as_directory() as d:
        path = Path(d) / CKPT_FILE
        return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def _checkpoint_of(snapshot: dict, checkpoint_cls, d: str):
    """A Checkpoint (Tune's or Train's class) holding `snapshot` in folder `d`, which the report call
    persists to the run's storage path (local or s3://)."""
    import torch
    torch.save(snapshot, Path(d) / CKPT_FILE)
    return checkpoint_cls.from_directory(d)


def _run_cell_trial(config: dict, ctx: dict, report, rank: int = 0, world: int = 1, wrap=None,
                    get_checkpoint=None, checkpoint_cls=None):
    """Initialize, fine-tune and score one descendant. `report(metrics, checkpoint=None)` gets every
    evaluation but the last, each with a checkpoint of the fine-tuning state (rank 0's; None on the
    others), then the final row (every rank calls it equally often). A trial restarted after a
    worker loss or a driver restart continues from `get_checkpoint()`'s step, not from step 0."""
    import shutil

    import torch

    from ..config import config_from_dict
    from ..descend import descendant_spec
    from ..finetune import load_task_data
    from ..pipeline import run_trial, setup_runtime

    cfg = config_from_dict(ctx["cfg"])
    setup_runtime(cfg)
    quiet_worker(rank)
    torch.set_num_threads(max(1, int(cfg.ray.tune.trial_cpus)))
    cell = cell_of(config["cell"])
    total = cfg.descendants.finetune.steps
    anc, learngenes, pretrained = _artifacts_for(ctx, cell)
    resume = _load_checkpoint(get_checkpoint() if get_checkpoint else None)
    if resume is not None:
        log.info("trial %s: resuming from its checkpoint at step %d", config["cell"], resume["step"])
    kill_at = int(ctx.get("kill_trial_at_step") or 0)  # fault injection (tests): SIGKILL, first attempt only

    def on_eval(step, metrics, snapshot):
        if step >= total:
            return
        tmp = tempfile.mkdtemp(prefix="mmlg-ft-") if checkpoint_cls is not None and rank == 0 else None
        try:
            ckpt = _checkpoint_of(snapshot(), checkpoint_cls, tmp) if tmp else None
            report(dict(metrics), checkpoint=ckpt)  # persisted to the run's storage path before it returns
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        if kill_at and resume is None and step >= kill_at:
            import signal
            log.warning("trial %s: killing its own process at step %d (MMLG_KILL_TRIAL_AT_STEP)", config["cell"], step)
            os.kill(os.getpid(), signal.SIGKILL)

    spec = descendant_spec(anc.spec, cell.depth, cell.width)
    key = (json.dumps(ctx["cfg"]["data"], sort_keys=True), cell.modality, spec.image_size)
    if key not in _TASK_DATA:  # a reused trial actor keeps its task data
        _TASK_DATA[key] = load_task_data(cfg, cell.modality, spec.image_size)
    data = _TASK_DATA[key]
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.ray.tune.trial_gpus > 0 and \
        torch.cuda.is_available() else torch.device("cpu")
    row = run_trial(cfg, cell, int(config["seed"]), lr=config["lr"], weight_decay=config["weight_decay"],
                    ancestor=anc, learngenes=learngenes, pretrained=pretrained, task_data=data,
                    on_eval=on_eval, device=device, rank=rank, world=world, wrap=wrap, resume=resume)
    hist = row.pop("history")
    final = {k: float(v) for k, v in hist[-1].items()}
    final.update({k: v for k, v in row.items() if not isinstance(v, (list, dict))})
    final.update(final_report=True, phase=config["phase"], history_json=json.dumps(hist))
    report(final)


def _ddp_worker(loop_config: dict):
    """A fine-tuning worker of a multi-worker trial (TorchTrainer inside the Tune trial). Its
    checkpoints are the TorchTrainer run's (storage/ft-<trial id>): a worker loss restarts the
    workers from the latest one, and so does a restarted trial (same run name and storage path)."""
    import ray.train
    import ray.train.torch
    ctx = loop_config["ctx"]
    if not isinstance(ctx, dict):
        import ray
        ctx = ray.get(ctx)
    tc = ray.train.get_context()
    _run_cell_trial(loop_config["config"], ctx, lambda m, checkpoint=None: ray.train.report(m, checkpoint=checkpoint),
                    rank=tc.get_world_rank(), world=tc.get_world_size(), wrap=ray.train.torch.prepare_model,
                    get_checkpoint=ray.train.get_checkpoint, checkpoint_cls=ray.train.Checkpoint)


def trial_fn(config: dict, ctx=None):
    """One Tune trial: initialize a descendant by its method, fine-tune it, report each evaluation
    with a checkpoint. With ray.tune.trial_workers > 1 the fine-tuning runs data-parallel in a
    TorchTrainer whose rank-0 metrics reach Tune (and its scheduler) through TuneReportCallback."""
    from ray import tune
    if "job" in config:  # seeds phase: the grid value is the whole trial spec
        config = {**config, **config["job"]}
    tcfg = ctx["cfg"]["ray"]["tune"]
    if tcfg["trial_workers"] <= 1:
        _run_cell_trial(config, ctx, lambda m, checkpoint=None: tune.report(m, checkpoint=checkpoint),
                        get_checkpoint=tune.get_checkpoint, checkpoint_cls=tune.Checkpoint)
        return
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    res = trial_worker_resources(TuneSettings.model_validate(tcfg))
    trainer = TorchTrainer(
        _ddp_worker, train_loop_config={"config": config, "ctx": ray.put(ctx)},
        scaling_config=ScalingConfig(num_workers=tcfg["trial_workers"], use_gpu=tcfg["trial_gpus"] > 0,
                                     resources_per_worker=res),
        run_config=RunConfig(name=f"ft-{tune.get_context().get_trial_id()}",
                             storage_path=ctx.get("storage"), callbacks=[TuneReportCallback()],
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             failure_config=FailureConfig(max_failures=ctx["cfg"]["ray"]["max_failures"]),
                             logging_config=train_logging()))
    trainer.fit()


def cell_tag(c: Cell) -> str:
    return f"{c.arm}|{c.modality}|{c.depth}|{c.width}"


def cell_of(tag: str) -> Cell:
    arm, mod, d, w = tag.split("|")
    return Cell(mod, int(d), int(w), *parse_arm(arm))


# --------------------------------------------------------------------------- stages
def _pretrain_task(cfg_json, ancestor, method, spec_json, budget, fail=False):
    from ..config import ModelSpec, config_from_dict
    from ..pipeline import pretrain_descendant, setup_runtime
    if fail:  # fault injection for tests (MMLG_FAIL_PRETRAIN), like extraction's MMLG_FAIL_AT_STEP
        raise RuntimeError(f"injected failure of pre-training {method} (MMLG_FAIL_PRETRAIN)")
    cfg = config_from_dict(cfg_json)
    setup_runtime(cfg)
    quiet_worker()
    return pretrain_descendant(cfg, ancestor, method, ModelSpec(**spec_json), budget=budget)


def _pretrain_fingerprint(cfg: Config) -> str:
    """What a pre-trained shape depends on: the ancestor, the corpus, the extraction's budget and
    optimizer (its 1x budget), pretrain_steps, seed, precision; not the elastic extraction's settings."""
    from ..pipeline import _fingerprint_of
    dumped = cfg.model_dump(mode="json")
    for name in ("elastic_weight", "elastic_shapes"):
        dumped["learngene"]["extraction"].pop(name, None)
    return _fingerprint_of(dumped, ("ancestor", "data.corpus", "learngene.extraction", "descendants.pretrain_steps",
                                    "seed", "precision"))


class PretrainFailed(JobFailed):
    """Some descendant shapes failed to pre-train; the others were written and a rerun reuses them."""


def _stage_pretrain(cfg: Config, anc, out: OutputDir, stages: list):
    """pt_ft / csm pre-training of each descendant shape as parallel Ray tasks. Each shape's weights
    and cost are written to the output folder (a URI: uploaded) as soon as its task finishes, so a
    failed shape, a lost driver or a rerun keeps every shape that had finished; after all tasks are
    done, one error names the shapes that failed. A task is retried on the loss of its worker or
    node (ray.max_failures times), never on an exception of its own."""
    import ray
    from safetensors.torch import load_file, save_file

    from ..atomic import atomic_path, write_json
    results = {}
    todo = []
    fp = _pretrain_fingerprint(cfg)
    shapes = needs_pretraining(cfg, anc.spec)
    for method, spec, budget in shapes:
        name = f"pretrained/{method}-{shape_key(spec)}-{budget:g}x-{fp}"
        weights, cost = out.fetch(name + ".safetensors"), out.fetch(name + ".json")
        if weights is not None and cost is not None:
            results[(method, shape_key(spec), budget)] = (load_file(str(weights)), json.loads(cost.read_text()))
            log.info("pretrain %s: reusing %s", pretrain_name(method, spec, budget), out.uri(name + ".safetensors"))
        else:
            todo.append((method, spec, budget, name))
    failed = []
    if todo:
        remote = ray.remote(**pretrain_task_options(cfg.ray.tune), max_retries=cfg.ray.max_failures,
                            retry_exceptions=False)(_pretrain_task)
        inject = os.environ.get("MMLG_FAIL_PRETRAIN", "")  # "method/shape" of a shape whose task must fail
        anc_ref = ray.put(anc)
        pending = {remote.remote(cfg.model_dump(mode="json"), anc_ref, m, s.model_dump(), b,
                                 fail=inject in (f"{m}/{shape_key(s)}", pretrain_name(m, s, b))): (m, s, b, n)
                   for m, s, b, n in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            method, spec, budget, name = pending.pop(ready[0])
            try:
                state, c = ray.get(ready[0])
            except Exception as e:  # a task's error, or its worker / node lost more often than retried
                log.error("pretrain %s failed: %s", pretrain_name(method, spec, budget),
                          str(e).strip().splitlines()[-1])
                failed.append((pretrain_name(method, spec, budget), e))
                continue
            with atomic_path(out.path(name + ".safetensors")) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            write_json(out.path(name + ".json"), c)
            out.push(name + ".safetensors")
            out.push(name + ".json")  # last: a shape counts as finished once both are there
            log.info("pretrain %s: wrote %s", pretrain_name(method, spec, budget), out.uri(name + ".safetensors"))
            results[(method, shape_key(spec), budget)] = (state, c)
    if failed:
        user = [e for _, e in failed if isinstance(e, UserError)]
        if user:  # bad input (e.g. an unreadable corpus): the usual one line (not Ray's traceback), exit 2
            raise UserError(user[0].field, user[0].message, user[0].fix)
        names = ", ".join(n for n, _ in failed)
        raise PretrainFailed(
            f"pre-training failed for {len(failed)} of {len(todo)} descendant shapes: {names} "
            f"(first error: {str(failed[0][1]).strip().splitlines()[-1]}); the {len(results)} finished shapes "
            f"are in {out.uri('pretrained')} and a rerun reuses them") from failed[0][1]
    results = {(m, shape_key(sp), b): results[(m, shape_key(sp), b)] for m, sp, b in shapes}  # the grid's order
    for method, spec, budget in shapes:
        c = results[(method, shape_key(spec), budget)][1]
        stages.append({"stage": "pretrain", "name": pretrain_name(method, spec, budget), **_cost_cols(c)})
    return results


def _cost_cols(c):
    from ..pipeline import _cost_cols as cc
    return cc(c)


# --------------------------------------------------------------------------- the main job
def run_sweep(cfg: Config, out_dir, resume: bool = False, fresh: bool = False) -> Path | str:
    """The main job. `resume` continues the interrupted Tune experiments of this experiment identity
    (Config.experiment_fingerprint) from storage; `fresh` deletes them first and starts over. Without
    either, an interrupted experiment is refused, and a finished one only has its report rebuilt.
    `out_dir` is a local folder or a URI (s3://...): its files are staged locally and uploaded as
    they are written, and what it already holds is read back from there."""
    from ray import tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    from ..ancestor import get_ancestor
    from ..learngene import load_learngene
    from ..pipeline import setup_runtime
    from ..report import build_output_report
    from ..atomic import write_json
    from ..results import write_run_files, write_tables
    from .extract import check_precision, extract_on_ray

    setup_runtime(cfg)
    import torch
    # the driver's own stages (local ancestor pre-training, consolidation) may use every core here;
    # a job's driver inherits OMP_NUM_THREADS=1 from Ray otherwise
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    # a local folder, or a URI (s3://...) whose files are staged locally and uploaded as written
    od = OutputDir(out_dir, cfg.cache_path)
    out = od.local
    storage = storage_uri(cfg, od.target)
    fp = cfg.experiment_fingerprint()  # the experiment's identity: result-affecting settings only
    if resume and fresh:
        raise UserError("--fresh", "--fresh starts the experiment over and --resume continues it", "pass one of them")
    if not resume and not fresh and _holds_results(od, cfg, fp):
        log.info("sweep: %s already holds the results of this experiment; rebuilding the report only", od)
        write_run_files(out, cfg)  # operational and report settings may have changed
        od.push("config.yaml")
        build_output_report(od)
        return od.target if od.remote else out
    if {"mmlg", "tleg"} & set(cfg.descendants.grid.method):
        check_precision(cfg)  # before any work (or --fresh's deletion), not after the ancestor
    check_logging(cfg, od.target)
    previous = [p for p in (f"{storage}/search-{fp}", f"{storage}/seeds-{fp}") if stor.exists(p)]
    if previous and fresh:
        for p in previous:
            log.info("sweep: --fresh: removing the earlier experiment state %s", p)
            stor.remove(p)
    elif previous and not resume:
        raise UserError("--resume", f"an interrupted sweep of this experiment exists under {storage}",
                        "add --resume to continue it, or --fresh to start it over")
    elif resume and not previous:
        log.warning("sweep: --resume: no earlier run of this experiment (%s) under %s; starting it", fp, storage)
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray(cfg)
    check_storage(cfg, storage)
    t_job = time.perf_counter()

    # ancestor
    st = Stage("ancestor", cfg.ancestor.source)
    anc = get_ancestor(cfg)
    st.done(f"fingerprint {anc.fingerprint[:12]}")
    stages = [{"stage": "ancestor", "name": anc.source, **_cost_cols(anc.cost)}]
    write_run_files(out, cfg, anc)
    od.push("config.yaml")
    od.push("ancestor.json")
    # learngenes: the driver writes each one (consolidated from the ZeRO checkpoint in storage)
    learngenes = {}
    for method, mode in learngene_arms(cfg):
        key = arm_name(method, mode)
        name = learngene_name(cfg, method, mode)
        path = od.fetch(name)
        st = Stage(f"extraction {key}")
        if path is not None:
            log.info("extraction %s: reusing %s", key, od.uri(name))
        else:
            path = od.path(name)
            extract_on_ray(cfg, anc, path, method=method, storage=storage, mode=mode)
            od.push(name)
        learngenes[key] = load_learngene(path)
        st.done(od.uri(name))
        stages.append({"stage": "extraction", "name": key, "artifact": od.uri(name),
                       **_cost_cols(learngenes[key].meta.cost)})
    # descendant pre-training (pt_ft, csm)
    st = Stage("pretrain", "pt_ft / csm descendant shapes")
    pretrained = _stage_pretrain(cfg, anc, od, stages)
    st.done(f"{len(pretrained)} shapes")

    ctx = {"cfg": cfg.model_dump(mode="json"), **share_artifacts(anc, learngenes, pretrained), "storage": storage,
           "kill_trial_at_step": os.environ.get("MMLG_KILL_TRIAL_AT_STEP")}
    tcfg = cfg.ray.tune
    # a multi-worker trial only drives its TorchTrainer: a sliver of CPU, its workers hold the rest
    resources = trial_resources(tcfg)
    trainable = tune.with_resources(tune.with_parameters(trial_fn, ctx=ctx), resources)
    grid = cells(cfg)
    tags = [cell_tag(c) for c in grid]
    fcfg = cfg.descendants.finetune
    max_t = -(-fcfg.steps // fcfg.eval_every)

    def phase(name: str, **tuner_kw):
        """A Tune experiment of this sweep: restored from storage with --resume, else new."""
        path = f"{storage}/{name}-{fp}"
        if resume and _restorable(path):
            log.info("sweep: resuming %s from %s", name, path)
            # the seeds phase's grid is given again: a driver killed while that phase was starting may
            # have stored no usable param_space, and its restored trials would lack their "job"
            return Tuner.restore(path, trainable=trainable, resume_errored=True, resume_unfinished=True,
                                 param_space=tuner_kw.get("param_space"))
        # a trial lost with its worker (preempted node, killed process) is retried up to
        # ray.max_failures times from its latest checkpoint (one kept per trial: each evaluation's)
        return Tuner(trainable, run_config=RunConfig(
            storage_path=storage, name=f"{name}-{fp}", verbose=1, progress_reporter=status_reporter(cfg, name),
            callbacks=tune_callbacks(cfg, od.target, name), checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures)), **tuner_kw)

    # search phase: Optuna per cell + ASHA per cell, first seed
    scheduler = make_cell_scheduler(cfg, max_t)
    tuner = phase("search", tune_config=TuneConfig(
        search_alg=make_cell_searcher(cfg, tags, cfg.descendants.seeds[0], scheduler), scheduler=scheduler,
        num_samples=len(tags) * tcfg.num_samples, max_concurrent_trials=tcfg.max_concurrent, reuse_actors=True))
    st = Stage("search", f"{len(tags)} cells x {tcfg.num_samples} Optuna samples, seed {cfg.descendants.seeds[0]}")
    search = tuner.fit()
    _check_complete(search, "search", len(tags) * tcfg.num_samples)
    rows = _rows(search)
    st.done(f"{len(rows)} trials")

    # seeds phase: each cell's best hyper-parameters (by validation score) with the remaining seeds
    # (errored trials never count)
    best = {}
    for r in rows:
        t = r["cell"]
        if r["status"] == "error":
            continue
        # a finished trial before one ASHA cut short (whose score is from fewer steps), then validation
        if t not in best or (r["status"] == "finished", r["score_for_selection"]) > \
                (best[t]["status"] == "finished", best[t]["score_for_selection"]):
            best[t] = r
    extra = [{"cell": t, "lr": best[t]["lr"], "weight_decay": best[t]["weight_decay"], "seed": s, "phase": "seeds"}
             for t in tags if t in best for s in cfg.descendants.seeds[1:]]
    if extra:
        tuner2 = phase("seeds", param_space={"job": tune.grid_search(extra)},
                       tune_config=TuneConfig(max_concurrent_trials=tcfg.max_concurrent, reuse_actors=True))
        st = Stage("seeds", f"{len(extra)} trials: each cell's best hyper-parameters, seeds {cfg.descendants.seeds[1:]}")
        seeds_grid = tuner2.fit()
        _check_complete(seeds_grid, "seeds", len(extra))
        seeded = _rows(seeds_grid)
        rows += seeded
        st.done(f"{len(seeded)} trials")
    failed = _failure_summary(rows, tags)
    for r in rows:
        r.pop("score_for_selection", None)
        r.pop("cell", None)
    st = Stage("tables")
    write_tables(out, rows, stages)
    # complete: every cell has a finished trial; an incomplete experiment is not "done" for a plain rerun
    write_json(out / "experiment.json", {"fingerprint": fp, "sections": list(cfg.RESULT_SECTIONS),
                                         "complete": failed is None})
    # trials.parquet last: with experiment.json it marks a finished run
    for name in ("stages.parquet", "history.parquet", "experiment.json", "trials.parquet"):
        od.push(name)
    st.done(str(od))
    if any(r["status"] != "error" for r in rows):
        st = Stage("report")
        build_output_report(od)
        st.done(od.uri("report/report.html"))
        log.info("sweep: %d trials in %.0f s; tables in %s; report %s", len(rows), time.perf_counter() - t_job, od,
                 od.uri("report/report.html"))
    else:
        log.warning("sweep: no trial ran to its end; tables in %s, no report", od)
    if failed:
        raise JobFailed(failed)
    return od.target if od.remote else out


def _check_complete(result_grid, phase: str, expected: int) -> None:
    """Tune returns from fit() on Ctrl-C (or a job stopped with SIGINT) with trials still pending or
    running: nothing is recorded then (no tables, no experiment.json), and --resume continues."""
    trials = result_grid._experiment_analysis.trials
    ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    if ended < expected:
        raise JobFailed(f"the {phase} phase was interrupted with {expected - ended} of {expected} trials unfinished; "
                        "rerun with --resume to continue it")


def _failure_summary(rows: list[dict], tags: list[str]) -> str | None:
    """Logs one line on the errored trials; returns the job's failure message when a grid cell has no
    finished trial (its results would be missing from every comparison), else None."""
    errored = [r for r in rows if r["status"] == "error"]
    if errored:
        first = {}
        for r in errored:
            first.setdefault(r["cell"], r["error"])
        log.warning("sweep: %d of %d trials errored, in %d cells: %s", len(errored), len(rows), len(first),
                    "; ".join(f"{c}: {e}" for c, e in first.items()))
    finished = {r["cell"] for r in rows if r["status"] == "finished"}
    missing = [t for t in tags if t not in finished]
    if missing:
        return (f"{len(missing)} of {len(tags)} grid cells have no finished trial ({', '.join(missing[:5])}"
                f"{', ...' if len(missing) > 5 else ''}); trials.parquet lists each trial's status and error; "
                "rerun with --resume to retry the errored trials")
    return None


def _holds_results(out: OutputDir, cfg: Config, fp: str) -> bool:
    """The output folder (local or URI) has the tables of this experiment identity (experiment.json,
    written with the tables; an older folder without it: the very same config.yaml)."""
    if out.fetch("trials.parquet") is None:
        return False
    exp = out.read_text("experiment.json")
    if exp is not None:
        exp = json.loads(exp)
        if exp.get("fingerprint") != fp:
            return False
        if not exp.get("complete", True):
            raise UserError("--resume", f"{out} holds this experiment's results, but some grid cells have no "
                            "finished trial", "add --resume to retry its errored trials, or --fresh to start it over")
        return True
    from ..config import dump_config
    return out.read_text("config.yaml") == dump_config(cfg)


def _restorable(path: str) -> bool:
    """A Tune experiment that can really be restored: its tuner file *and* an experiment state. A
    driver killed while a phase was starting leaves the first without the second; restoring that
    would start trials without their configs, so such a phase is started anew (none of its trials
    had finished)."""
    from ray.tune import Tuner
    if not Tuner.can_restore(path):
        return False
    return bool(stor.list_files(path, "experiment_state-*.json", recursive=False))


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


def _rows(result_grid) -> list[dict]:
    """One row per trial from a Tune ResultGrid (its stored state, so resumed runs count once), with
    its `status`: finished, stopped_early (cut by ASHA), or error (and the error's first line). A
    trial that errored before its first report still has its row (its cell, seed and
    hyper-parameters, no scores)."""
    rows = []
    for res in result_grid:
        m = dict(res.metrics or {})
        cfg = res.config or {}
        if "job" in cfg:
            cfg = {**cfg, **cfg["job"]}
        if "cell" not in cfg:
            continue
        trial_id = str(m.get("trial_id") or res.path.rstrip("/").rsplit("/", 1)[-1])
        status = "error" if res.error is not None else \
            ("finished" if m.get("final_report") else "stopped_early")
        if not m.get("trial"):  # no report at all: describe it from its config
            c = cell_of(cfg["cell"])
            m = {"trial": f"{c.tag}-s{cfg['seed']}", "method": c.method, "arm": c.arm, "extraction": c.extraction,
                 "pt_budget": c.pt_budget, "modality": c.modality, "depth": c.depth, "width": c.width,
                 "seed": int(cfg["seed"]), "lr": float(cfg["lr"]), "weight_decay": float(cfg["weight_decay"])}
        hist = json.loads(m["history_json"]) if "history_json" in m else _history_from_df(res)
        row = {k: v for k, v in m.items() if k not in ("history_json", "final_report", "config") and
               not isinstance(v, dict)}
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
        row["status"] = status
        row["error"] = _error_line(res.error) if res.error is not None else ""
        row["stopped_early"] = status == "stopped_early"
        row["trial_id"] = trial_id
        row["trial"] = f"{row['trial']}-{trial_id}"
        row["cell"] = cfg["cell"]
        row["score_for_selection"] = float(m.get("val_score", float("-inf")))  # validation, never test
        for k in [k for k in row if k in EVAL_KEYS or k.startswith(("i2t_", "t2i_"))]:
            row.pop(k)
        for k in [k for k in row if k in ("training_iteration", "time_this_iter_s", "time_total_s", "timestamp",
                                           "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
                                           "checkpoint_dir_name", "done", "date", "experiment_tag", "should_checkpoint",
                                           "checkpoint_path")]:
            row.pop(k, None)
        row["val_score"] = float(m.get("val_score", float("nan")))
        row["history"] = hist
        rows.append(row)
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
