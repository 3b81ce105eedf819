"""The command-line entry points: `mmlg-sweep`, `mmlg-extract`, `mmlg-descend`, `mmlg-report`,
`mmlg-rehearse` (console scripts), also run as `python jobs/<name>.py` (what `ray job submit` runs).
Each parses its arguments and config, then calls the library. This module holds what they share."""

from __future__ import annotations

import argparse
import re

from mmlg_ray.config import Config, load_config
from mmlg_ray.errors import UserError


DOCS = (
    "config keys and presets: docs/configuration.md (every key with its default: configs/local.yaml); "
    "the files a run writes: docs/files.md"
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (a missing or unknown flag, a value of the wrong type or not among the
    choices) are UserErrors: one line naming the flag, exit code 2, like every other bad input.
    --help ends by naming where the config keys and outputs are documented."""

    def __init__(self, *args, **kw):
        kw.setdefault("epilog", DOCS)
        super().__init__(*args, **kw)

    def error(self, message: str):
        m = re.match(r"argument ([^:]+): (.*)", message)
        if m:
            field, message = m.group(1).split("/")[-1], m.group(2)
        else:  # "the following arguments are required: --out, --modality", "unrecognized arguments: --x 1"
            named = message.split(":", 1)[-1].replace(",", " ").split()
            field = named[0] if ":" in message and named else "arguments"
        raise UserError(field, message, f"see {self.prog} --help")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config (default: built-in defaults = configs/local.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set learngene.schedule=convex (repeatable)",
    )


def config_from_args(args) -> Config:
    return load_config(args.config, args.overrides)


def run_sweep(cfg: Config, out, executor, resume: bool = False, fresh: bool = False):
    """jobs/sweep.py after its preflight: the --resume / --fresh rules, then the job on `executor`
    (mmlg_ray.engine.job.LocalExecutor, or the Ray layer's RayExecutor). Without either flag, an interrupted
    experiment is refused and a finished one only has its report rebuilt; --fresh deletes this
    experiment's earlier Tune state (stage artifacts are kept)."""
    import logging

    from mmlg_ray import storage as stor
    from mmlg_ray.engine.job import run
    from mmlg_ray.storage import OutputDir

    log = logging.getLogger("mmlg_ray")
    if resume and fresh:
        raise UserError("--fresh", "--fresh starts the experiment over and --resume continues it", "pass one of them")
    od = OutputDir(out, cfg.cache_path)
    fp = cfg.experiment_fingerprint()  # the experiment's identity: result-affecting settings only
    if not resume and not fresh and _holds_results(od, cfg, fp):
        from mmlg_ray.report import build_output_report
        from mmlg_ray.engine.results import write_run_files

        log.info("sweep: %s already holds the results of this experiment; rebuilding the report only", od)
        write_run_files(od.local, cfg)  # operational and report settings may have changed
        od.push("config.yaml")
        build_output_report(od)
        return od.target if od.remote else od.local
    storage = executor.storage(cfg, od)
    executor.check(cfg, od)  # the executor's own settings, before anything is written
    previous = executor.previous_state(storage, fp)
    if previous and fresh:
        for p in previous:
            log.info("sweep: --fresh: removing the earlier experiment state %s", p)
            stor.remove(p)
    elif previous and not resume:
        raise UserError(
            "--resume",
            f"an interrupted sweep of this experiment exists under {storage}",
            "add --resume to continue it, or --fresh to start it over",
        )
    elif resume and not previous:
        log.warning("sweep: --resume: no earlier run of this experiment (%s) under %s; starting it", fp, storage)
    elif previous:  # and --resume
        executor.check_resume(cfg, storage, fp)
    return run(cfg, od.target, executor, resume=resume and bool(previous), storage=storage)


def _holds_results(out, cfg: Config, fp: str) -> bool:
    """The output folder (local or URI) has the tables of this experiment identity (experiment.json,
    written with the tables; an older folder without it: the very same config.yaml)."""
    import json

    if out.fetch("trials.parquet") is None:
        return False
    exp = out.read_text("experiment.json")
    if exp is not None:
        exp = json.loads(exp)
        if exp.get("fingerprint") != fp:
            return False
        if not exp.get("complete", True):
            raise UserError(
                "--resume",
                f"{out} holds this experiment's results, but some grid cells are incomplete "
                "(a trial errored, none finished, or seed re-runs are lacking)",
                "add --resume to retry its errored trials, or --fresh to start it over",
            )
        return True
    from mmlg_ray.config import dump_config

    return out.read_text("config.yaml") == dump_config(cfg)
