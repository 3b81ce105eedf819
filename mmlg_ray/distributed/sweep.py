"""The descendant sweep on Ray Tune, and the whole main job around it.

Stages, each skipped when its artifact exists for the same config:
  ancestor     local default: pre-trained once and cached; clusters: loaded (open_clip tag / file)
  extraction   one learngene per learngene method in the grid (mmlg, tleg), on Ray Train + DeepSpeed
  pretrain     pt_ft / csm: each descendant shape pre-trained on the corpus, as parallel Ray tasks,
               measured (their cost is what the report compares against)
  search       Ray Tune over the grid depth x width x modality x method: within every cell an Optuna
               searcher proposes fine-tuning hyper-parameters (lr, weight decay) and an ASHA scheduler
               of that cell cuts weak trials (scores of different tasks are never compared); first seed
  seeds        every cell's best hyper-parameters re-run with the other seeds (no early stopping)
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
from ..errors import UserError
from ..pipeline import Cell, cells, learngene_path, needs_pretraining, shape_key
from .settings import ensure_ray, pretrain_task_options, storage_uri, trial_resources, trial_worker_resources

log = logging.getLogger("mmlg_ray")
METRIC, MODE = "score", "max"
EVAL_KEYS = {"score", "top1", "accuracy", "mean_recall", "zeroshot_top1", "step", "epoch", "train_loss"}


# --------------------------------------------------------------------------- per-cell search + scheduling
def _cell_key(config: dict) -> str:
    return config["cell"]


def make_cell_searcher(cfg: Config, cell_tags: list[str], seed0: int):
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch
    from ray import tune

    space_cfg = cfg.ray.tune.search_space
    n = cfg.ray.tune.num_samples

    class CellSearcher(Searcher):
        """One OptunaSearch per grid cell, `n` suggestions each, round-robin over cells."""

        def __init__(self):
            super().__init__(metric=METRIC, mode=MODE)
            self.cells = list(cell_tags)
            self.count = {c: 0 for c in self.cells}
            self.owner: dict[str, str] = {}
            self.subs = {}
            for i, c in enumerate(self.cells):
                space = {"lr": tune.loguniform(*space_cfg.lr), "weight_decay": tune.uniform(*space_cfg.weight_decay)}
                sub = OptunaSearch(space=space, metric=METRIC, mode=MODE, seed=(cfg.seed * 1000 + i) % 2 ** 32)
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
                pickle.dump({"count": self.count, "owner": self.owner, "cursor": self.cursor, "subs": subs}, f)

        def restore(self, checkpoint_path):
            with open(checkpoint_path, "rb") as f:
                st = pickle.load(f)
            self.count, self.owner, self.cursor = st["count"], st["owner"], st["cursor"]
            for c, blob in st["subs"].items():
                with tempfile.NamedTemporaryFile(delete=False) as f:
                    f.write(blob)
                self.subs[c].restore(f.name)
                os.unlink(f.name)

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
            "pretrained": {k: ray.put(v) for k, v in pretrained.items()}}


def _artifacts_for(ctx: dict, cell):
    """(ancestor, learngenes, pretrained) for one cell, fetched by reference."""
    from ..descend import descendant_spec
    from ..pipeline import shape_key
    anc = ctx["ancestor_spec"]
    if cell.method in ("weight_selection", "heur_lg"):
        anc = _fetch(ctx["ancestor"])
    learngenes = {cell.method: _fetch(ctx["learngenes"][cell.method])} if cell.method in ctx["learngenes"] else {}
    key = (cell.method, shape_key(descendant_spec(anc.spec, cell.depth, cell.width)))
    pretrained = {key: _fetch(ctx["pretrained"][key])} if key in ctx["pretrained"] else {}
    return anc, learngenes, pretrained


def _run_cell_trial(config: dict, ctx: dict, report, rank: int = 0, world: int = 1, wrap=None):
    """Initialize, fine-tune and score one descendant; `report` gets every evaluation but the last,
    then the final row (every rank calls it equally often)."""
    import torch

    from ..config import config_from_dict
    from ..descend import descendant_spec
    from ..finetune import load_task_data
    from ..pipeline import Cell, run_trial, setup_runtime

    cfg = config_from_dict(ctx["cfg"])
    setup_runtime(cfg)
    torch.set_num_threads(max(1, int(cfg.ray.tune.trial_cpus)))
    m, mod, d, w = config["cell"].split("|")
    cell = Cell(mod, int(d), int(w), m)
    total = cfg.descendants.finetune.steps
    anc, learngenes, pretrained = _artifacts_for(ctx, cell)

    def on_eval(step, metrics):
        if step < total:
            report(dict(metrics))

    spec = descendant_spec(anc.spec, cell.depth, cell.width)
    key = (json.dumps(ctx["cfg"]["data"], sort_keys=True), cell.modality, spec.image_size)
    if key not in _TASK_DATA:  # a reused trial actor keeps its task data
        _TASK_DATA[key] = load_task_data(cfg, cell.modality, spec.image_size)
    data = _TASK_DATA[key]
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.ray.tune.trial_gpus > 0 and \
        torch.cuda.is_available() else torch.device("cpu")
    row = run_trial(cfg, cell, int(config["seed"]), lr=config["lr"], weight_decay=config["weight_decay"],
                    ancestor=anc, learngenes=learngenes, pretrained=pretrained, task_data=data,
                    on_eval=on_eval, device=device, rank=rank, world=world, wrap=wrap)
    hist = row.pop("history")
    final = {k: float(v) for k, v in hist[-1].items()}
    final.update({k: v for k, v in row.items() if not isinstance(v, (list, dict))})
    final.update(final_report=True, phase=config["phase"], history_json=json.dumps(hist))
    report(final)


def _ddp_worker(loop_config: dict):
    """A fine-tuning worker of a multi-worker trial (TorchTrainer inside the Tune trial)."""
    import ray.train
    import ray.train.torch
    ctx = loop_config["ctx"]
    if not isinstance(ctx, dict):
        import ray
        ctx = ray.get(ctx)
    tc = ray.train.get_context()
    _run_cell_trial(loop_config["config"], ctx, lambda m: ray.train.report(m), rank=tc.get_world_rank(),
                    world=tc.get_world_size(), wrap=ray.train.torch.prepare_model)


def trial_fn(config: dict, ctx=None):
    """One Tune trial: initialize a descendant by its method, fine-tune it, report each evaluation.
    With ray.tune.trial_workers > 1 the fine-tuning runs data-parallel in a TorchTrainer whose rank-0
    metrics reach Tune (and its scheduler) through TuneReportCallback."""
    from ray import tune
    if "job" in config:  # seeds phase: the grid value is the whole trial spec
        config = {**config, **config["job"]}
    tcfg = ctx["cfg"]["ray"]["tune"]
    if tcfg["trial_workers"] <= 1:
        _run_cell_trial(config, ctx, tune.report)
        return
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    res = trial_worker_resources(TuneSettings.model_validate(tcfg))
    trainer = TorchTrainer(
        _ddp_worker, train_loop_config={"config": config, "ctx": ray.put(ctx)},
        scaling_config=ScalingConfig(num_workers=tcfg["trial_workers"], use_gpu=tcfg["trial_gpus"] > 0,
                                     resources_per_worker=res),
        run_config=RunConfig(name=f"ft-{tune.get_context().get_trial_id()}",
                             storage_path=ctx.get("storage"), callbacks=[TuneReportCallback()]))
    trainer.fit()


def cell_tag(c: Cell) -> str:
    return f"{c.method}|{c.modality}|{c.depth}|{c.width}"


# --------------------------------------------------------------------------- stages
def _pretrain_task(cfg_json, ancestor, method, spec_json):
    from ..config import ModelSpec, config_from_dict
    from ..pipeline import pretrain_descendant, setup_runtime
    cfg = config_from_dict(cfg_json)
    setup_runtime(cfg)
    return pretrain_descendant(cfg, ancestor, method, ModelSpec(**spec_json))


def _stage_pretrain(cfg: Config, anc, out: Path, stages: list):
    """pt_ft / csm pre-training of each descendant shape: parallel Ray tasks, cached as files."""
    import ray
    from safetensors.torch import load_file, save_file

    from ..atomic import atomic_path, write_json
    results = {}
    todo = []
    fp = cfg.fingerprint("ancestor", "data.corpus", "learngene.extraction", "descendants.pretrain_steps", "seed",
                         "precision")
    for method, spec in needs_pretraining(cfg, anc.spec):
        base = out / "pretrained" / f"{method}-{shape_key(spec)}-{fp}"
        if base.with_suffix(".safetensors").is_file() and base.with_suffix(".json").is_file():
            results[(method, shape_key(spec))] = (load_file(str(base.with_suffix(".safetensors"))),
                                                  json.loads(base.with_suffix(".json").read_text()))
            log.info("pretrain %s %s: reusing %s", method, shape_key(spec), base)
        else:
            todo.append((method, spec, base))
    if todo:
        res = cfg.ray.tune
        remote = ray.remote(**pretrain_task_options(res))(_pretrain_task)
        anc_ref = ray.put(anc)
        refs = [remote.remote(cfg.model_dump(mode="json"), anc_ref, m, s.model_dump()) for m, s, _ in todo]
        for (method, spec, base), ref in zip(todo, refs):
            state, c = ray.get(ref)
            with atomic_path(base.with_suffix(".safetensors")) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            write_json(base.with_suffix(".json"), c)
            results[(method, shape_key(spec))] = (state, c)
    for (method, key), (_, c) in results.items():
        stages.append({"stage": "pretrain", "name": f"{method}/{key}", **_cost_cols(c)})
    return results


def _cost_cols(c):
    from ..pipeline import _cost_cols as cc
    return cc(c)


# --------------------------------------------------------------------------- the main job
def run_sweep(cfg: Config, out_dir, resume: bool = False) -> Path:
    from ray import tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    from ..ancestor import get_ancestor
    from ..learngene import load_learngene
    from ..pipeline import setup_runtime
    from ..report import build_report
    from ..results import write_run_files, write_tables
    from .extract import check_precision, extract_on_ray

    setup_runtime(cfg)
    import torch
    # the driver's own stages (local ancestor pre-training, consolidation) may use every core here;
    # a job's driver inherits OMP_NUM_THREADS=1 from Ray otherwise
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    out = Path(out_dir)
    from ..config import dump_config
    done = out / "trials.parquet"
    same_cfg = (out / "config.yaml").is_file() and (out / "config.yaml").read_text() == dump_config(cfg)
    if done.is_file() and same_cfg and not resume:
        log.info("sweep: %s already holds the results of this config; rebuilding the report only", out)
        build_report(out)
        return out
    storage = storage_uri(cfg, out)
    fp = cfg.fingerprint()
    if not resume and "://" not in storage and (Path(storage) / f"search-{fp}").exists():
        raise UserError("--resume", f"an interrupted sweep of this config exists under {storage}",
                        "add --resume to continue it, or remove that folder to start over")
    if {"mmlg", "tleg"} & set(cfg.descendants.grid.method):
        check_precision(cfg)  # before any work, not after the ancestor
    out.mkdir(parents=True, exist_ok=True)
    ensure_ray(cfg)
    t_job = time.perf_counter()

    # ancestor
    anc = get_ancestor(cfg)
    stages = [{"stage": "ancestor", "name": anc.source, **_cost_cols(anc.cost)}]
    write_run_files(out, cfg, anc)
    # learngenes
    learngenes = {}
    for method in [m for m in ("mmlg", "tleg") if m in cfg.descendants.grid.method]:
        path = learngene_path(cfg, out, method)
        if path.is_file():
            log.info("extraction %s: reusing %s", method, path)
        else:
            extract_on_ray(cfg, anc, path, method=method, storage=storage)
        learngenes[method] = load_learngene(path)
        stages.append({"stage": "extraction", "name": method, "artifact": str(path),
                       **_cost_cols(learngenes[method].meta.cost)})
    # descendant pre-training (pt_ft, csm)
    pretrained = _stage_pretrain(cfg, anc, out, stages)

    ctx = {"cfg": cfg.model_dump(mode="json"), **share_artifacts(anc, learngenes, pretrained), "storage": storage}
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
        return Tuner(trainable, run_config=RunConfig(
            storage_path=storage, name=f"{name}-{fp}", verbose=1,
            failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures)), **tuner_kw)

    # search phase: Optuna per cell + ASHA per cell, first seed
    tuner = phase("search", tune_config=TuneConfig(
        search_alg=make_cell_searcher(cfg, tags, cfg.descendants.seeds[0]), scheduler=make_cell_scheduler(cfg, max_t),
        num_samples=len(tags) * tcfg.num_samples, max_concurrent_trials=tcfg.max_concurrent, reuse_actors=True))
    search = tuner.fit()
    rows = _rows(search)

    # seeds phase: each cell's best hyper-parameters with the remaining seeds
    best = {}
    for r in rows:
        t = r["cell"]
        if t not in best or r["score_for_selection"] > best[t]["score_for_selection"]:
            best[t] = r
    extra = [{"cell": t, "lr": best[t]["lr"], "weight_decay": best[t]["weight_decay"], "seed": s, "phase": "seeds"}
             for t in tags if t in best for s in cfg.descendants.seeds[1:]]
    if extra:
        tuner2 = phase("seeds", param_space={"job": tune.grid_search(extra)},
                       tune_config=TuneConfig(max_concurrent_trials=tcfg.max_concurrent, reuse_actors=True))
        rows += _rows(tuner2.fit())
    for r in rows:
        r.pop("score_for_selection", None)
        r.pop("cell", None)
    write_tables(out, rows, stages)
    report = build_report(out)
    log.info("sweep: %d trials in %.0f s; tables in %s; report %s", len(rows), time.perf_counter() - t_job, out,
             report / "report.html")
    return out


def _restorable(path: str) -> bool:
    """A Tune experiment that can really be restored: its tuner file *and* an experiment state. A
    driver killed while a phase was starting leaves the first without the second; restoring that
    would start trials without their configs, so such a phase is started anew (none of its trials
    had finished)."""
    from ray.tune import Tuner
    if not Tuner.can_restore(path):
        return False
    import fsspec
    fs, p = fsspec.core.url_to_fs(path)
    return bool(fs.glob(p.rstrip("/") + "/experiment_state-*.json"))


def _rows(result_grid) -> list[dict]:
    """One row per trial from a Tune ResultGrid (its stored state, so resumed runs count once)."""
    rows = []
    for res in result_grid:
        m = dict(res.metrics or {})
        cfg = res.config or {}
        if "job" in cfg:
            cfg = {**cfg, **cfg["job"]}
        if not m:
            continue
        stopped = not m.get("final_report", False)
        hist = json.loads(m["history_json"]) if "history_json" in m else _history_from_df(res)
        row = {k: v for k, v in m.items() if k not in ("history_json", "final_report", "config") and
               not isinstance(v, dict)}
        if stopped:  # ASHA cut it: its last report carries the description and cost so far
            for k in list(m):
                if k in EVAL_KEYS - {"step", "epoch"} or k.startswith(("i2t_", "t2i_")):
                    row[f"final_{k}"] = float(m[k])
            best = {}
            for h in hist:
                if not best or h.get("score", -1) > best.get("score", -1):
                    best = h
            for k, v in best.items():
                if k not in ("step", "epoch", "train_loss", "linear_probe_init"):
                    row[f"best_{k}"] = float(v)
            row["epochs"] = len(hist)
            row["phase"] = cfg["phase"]
        row["stopped_early"] = stopped
        row["trial_id"] = str(m.get("trial_id", res.path.rsplit("/", 1)[-1]))
        row["trial"] = f"{row['trial']}-{row['trial_id']}"
        row["cell"] = cfg["cell"]
        row["score_for_selection"] = float(m.get("score", float("-inf")))
        for k in [k for k in row if k in EVAL_KEYS or k.startswith(("i2t_", "t2i_"))]:
            row.pop(k)
        for k in [k for k in row if k in ("training_iteration", "time_this_iter_s", "time_total_s", "timestamp",
                                           "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
                                           "checkpoint_dir_name", "done", "date", "experiment_tag", "should_checkpoint")]:
            row.pop(k, None)
        row["history"] = hist
        rows.append(row)
    return rows


def _history_from_df(res) -> list[dict]:
    df = res.metrics_dataframe
    if df is None or not len(df):
        return []
    keep = [c for c in df.columns if c in EVAL_KEYS or c.startswith(("i2t_", "t2i_"))]
    return df[keep].to_dict("records")
