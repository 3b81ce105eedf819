"""What the main job prints, and where the sweep's metrics go besides the Parquet tables.

The log a person reads (the driver's stdout and stderr, which `ray job submit` / `ray job logs` stream):
  * one line when each stage starts and one when it ends (`Stage`): ancestor, extraction per method,
    pre-training, the search and seeds phases, tables, report;
  * Ray Tune's status table every `ray.tune.status_every_s` seconds (`status_reporter`: Tune's
    CLIReporter under its classic output engine, which prints the table and no box per trial), and
    once, in full, at the end of each phase;
  * at most a few progress lines per training loop in a worker (`quiet_worker`), and rank 0's only;
  * warnings and errors, Ray's, DeepSpeed's, torch's and ours, except the known-harmless Python
    warnings named in `NOISE`. Also kept out, each at its place here with its reason: Tune's
    "snapshotting triggered multiple times" warning (RAY_ENV), Optuna's INFO line per study,
    Ray's INFO lines per checkpoint and per report (`train_logging`, `quiet_worker`), and what
    DeepSpeed prints building its comm op and consolidating a ZeRO checkpoint (`captured_output`).

Metrics besides the tables (`tune_callbacks`, Ray Tune's own logger callbacks, run on the driver):
  * TensorBoard (`ray.tune.tensorboard`, on by default): one event-file folder per trial under
    OUTPUT/tensorboard/<phase>/<cell>-seed<seed>-<trial id> (`tensorboard --logdir OUTPUT/tensorboard`),
    scalars under ray/tune/<metric> by Tune iteration (one per evaluation); an object-store OUTPUT
    keeps them in Tune's trial folders under the Ray storage path instead;
  * MLflow (`ray.tune.mlflow.enabled`): one MLflow run per trial in experiment
    `ray.tune.mlflow.experiment`, with its config as parameters and every result as metrics.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from mmlg_ray.config import Config
from mmlg_ray.errors import UserError

log = logging.getLogger("mmlg_ray")

# Environment of the driver (driver_env, where not set already) and of the processes of a local Ray
# instance that ensure_ray starts (its runtime_env). What workers need besides is set in code,
# quiet_worker(), so it holds in a submitted job and on a cluster too.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
    # Tune's classic output engine: the one whose CLIReporter prints a status table at a set interval
    # and no result box per trial (the new engine prints a config box when a trial starts and a
    # result box when it ends, and its table interval is fixed at 30 s)
    "RAY_AIR_NEW_OUTPUT": "0",
}

# Known-harmless warnings, silenced by message (a regular expression matched at the start) and
# category, in the driver and in every worker that calls quiet_worker(). Each says why.
NOISE: list[tuple[str, type[Warning], str]] = [
    (
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        FutureWarning,
        "DeepSpeed 0.19's ZeRO calls this torch API, which torch 2.14 still provides and runs; printed once "
        "per extraction worker and method, with nothing a user can do",
    ),
]


def driver_env() -> None:
    """Settings of RAY_ENV into this (the driver's) process, where the user has not set them."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    silence_known_noise()
    try:  # Optuna logs "A new study created in memory" at INFO, once per grid cell; its warnings stay
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass


def train_logging():
    """Ray Train's LoggingConfig of our TorchTrainers: its own `ray.train` records at WARNING and up on
    the console (not "Requesting resources", "Checkpoint successfully created", "Reporting training
    result" per worker and report); its log files under the session folder keep every level."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="WARNING")


def silence_known_noise() -> None:
    for message, category, _why in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_worker(rank: int = 0, lines: int = 4) -> None:
    """In a Ray worker (a Tune trial, a pre-training task, an extraction worker): at most `lines`
    progress lines per training loop, none from ranks other than 0, and the known noise silenced."""
    from mmlg_ray.method.train import Progress

    Progress.max_lines = lines if rank == 0 else 0
    if rank != 0:  # the other ranks of a data-parallel group say what rank 0 says: their warnings only
        log.setLevel(logging.WARNING)
    silence_known_noise()
    # "Checkpoint successfully created at: ..." at INFO, per trial and evaluation (Tune's trials
    # checkpoint at every evaluation); the checkpoints are listed in the trials' result files
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    try:  # Ray Train's "Reporting training result N: TrainingReport(...)", per worker and report, at INFO
        # under a logger named by its source file, which Train's LoggingConfig does not reach
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


@contextlib.contextmanager
def captured_output(what: str, stderr: bool = True):
    """Run a chatty call with what it prints to stdout (and stderr) captured: dropped when it
    returns, written to stderr before its exception when it raises. In a Ray Train worker, where
    Train turns print() into INFO records of the root logger (and a copy to the redirected stdout),
    the root logger is held at WARNING meanwhile. Records of loggers that have their own level and
    handlers (DeepSpeed's, Ray's, ours) pass as usual."""
    buf = io.StringIO()
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf) if stderr else contextlib.nullcontext():
            yield
    except BaseException:
        sys.stderr.write(f"--- output of {what} ---\n{buf.getvalue()}--- end of that output ---\n")
        raise
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------- stage lines
from mmlg_ray.engine.stagelog import Stage, _dur  # noqa: E402,F401 (the core's)


# --------------------------------------------------------------------------- Tune's status table
def status_reporter(cfg: Config, phase: str):
    """Ray Tune's CLIReporter: a status table every ray.tune.status_every_s seconds (at most 10 trial
    rows, running ones first; all of them in the last table of the phase), with the cell, the
    hyper-parameters and the score."""
    from ray.tune import CLIReporter

    pre = "job/" if phase == "seeds" else ""  # a seeds trial's spec is its config's "job"
    params = {f"{pre}cell": "cell", f"{pre}lr": "lr", f"{pre}weight_decay": "wd", f"{pre}seed": "seed"}
    # the "best trial" line ranks by validation, as the search does; the test score is shown beside it
    return CLIReporter(
        metric_columns={"val_score": "val", "score": "test", "training_iteration": "evals"},
        parameter_columns=params,
        max_progress_rows=10,
        max_error_rows=10,
        max_column_length=32,
        print_intermediate_tables=True,
        max_report_frequency=int(cfg.ray.tune.status_every_s),
        metric="val_score",
        mode="max",
    )


# --------------------------------------------------------------------------- TensorBoard, MLflow
def tensorboard_dir(out) -> Path | None:
    """OUTPUT/tensorboard; None for an object-store OUTPUT (the events stay in Tune's trial folders)."""
    return None if "://" in str(out) else Path(out).resolve() / "tensorboard"


def trial_run_name(trial) -> str:
    """A trial's readable name: <method>-<modality>-d<depth>-w<width>-seed<seed>-<trial id>."""
    c = dict(trial.config or {})
    c.update(c.get("job") or {})
    cell = str(c.get("cell", "trial"))
    parts = cell.split("|")
    if len(parts) == 4:
        cell = f"{parts[0]}-{parts[1]}-d{parts[2]}-w{parts[3]}"
    cell = cell.replace("/", "_").replace("@", "_")  # arms like mmlg/elastic, pt_ft@0.5x: one folder each
    return f"{cell}-seed{c.get('seed', 0)}-{trial.trial_id}"


def trial_phase(trial, default: str) -> str:
    """The trial's own phase (search | seeds), from its config; else the experiment's."""
    c = dict(trial.config or {})
    c.update(c.get("job") or {})
    return str(c.get("phase") or default)


def _tensorboard_callback(root: Path | None, phase: str):
    from ray.tune.logger import TBXLoggerCallback

    class TensorBoardCallback(TBXLoggerCallback):
        """Ray Tune's TensorBoardX logger, writing each trial's events to root/<phase>/<trial name>
        instead of the trial's own folder (which lives with checkpoints under the Ray storage path)."""

        def log_trial_start(self, trial):
            if root is None:
                return super().log_trial_start(trial)
            if trial in self._trial_writer:
                self._trial_writer[trial].close()
            logdir = root / trial_phase(trial, phase) / trial_run_name(trial)
            logdir.mkdir(parents=True, exist_ok=True)
            self._trial_writer[trial] = self._summary_writer_cls(str(logdir), flush_secs=30)
            self._trial_result[trial] = {}

    return TensorBoardCallback()


def mlflow_tracking_uri(cfg: Config, out) -> str | None:
    """ray.tune.mlflow.tracking_uri; unset: MLflow's MLFLOW_TRACKING_URI (None here), else a SQLite
    file beside the results, sqlite:///OUTPUT/mlflow.db."""
    uri = cfg.ray.tune.mlflow.tracking_uri
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    if "://" in str(out):
        raise UserError(
            "ray.tune.mlflow.tracking_uri",
            f"the output folder {out} is not local, so MLflow's " "default store beside it cannot be written",
            "set an MLflow server (http://...) or a " "local sqlite:///FILE",
        )
    return "sqlite:///" + str(Path(out).resolve() / "mlflow.db")


def _mlflow_callback(cfg: Config, out, phase: str):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError(
            "ray.tune.mlflow.enabled",
            "MLflow logging is on but the `mlflow` module is not installed",
            "pip install mlflow-skinny (pinned in requirements.txt), or set " "ray.tune.mlflow.enabled=false",
        ) from None
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = mlflow_tracking_uri(cfg, out)
    if uri and (uri.startswith("file:") or "://" not in uri):
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless opted in; a file
        # store asked for by name is what the user wants
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    class PhaseTagged(MLflowLoggerCallback):
        """MLflow's run per trial, tagged with the trial's own phase (search | seeds)."""

        def log_trial_start(self, trial):
            self.tags = {**base, "phase": trial_phase(trial, phase)}
            return super().log_trial_start(trial)

    base = {"phase": phase, "experiment": cfg.experiment_fingerprint()}
    return PhaseTagged(tracking_uri=uri, experiment_name=cfg.ray.tune.mlflow.experiment, tags=dict(base))


class _KeepsTheDriversCopy:
    """Tune's loggers copy a trial's file back from the storage path whenever the trial restarts from a
    checkpoint, over the driver's own copy. Storage holds the file as of Tune's last experiment sync
    (on a period: nothing forces one per checkpoint, see .checkpoints), so a trial whose worker died
    would lose the lines written since. The driver's copy is complete while the driver lives; storage's
    is used when the driver has none (a restored experiment)."""

    def _restore_from_remote(self, file_name, trial) -> None:
        if not Path(trial.local_path, file_name).exists():
            super()._restore_from_remote(file_name, trial)


# module-level: Tune pickles its callbacks into the experiment, and a restore imports them
class JsonLogger(_KeepsTheDriversCopy, JsonLoggerCallback):
    """result.json per trial."""


class CsvLogger(_KeepsTheDriversCopy, CSVLoggerCallback):
    """progress.csv per trial."""


def tune_callbacks(cfg: Config, out, phase: str) -> list:
    """The logger callbacks of one Tune phase: Tune's CSV and JSON loggers (the trials' result files,
    which resume and the tables read), TensorBoard and MLflow as configured. Passed explicitly, so
    Tune adds none of its own (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS): with ray.tune.tensorboard off
    there is no TensorBoard file anywhere."""
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    cbs = [CsvLogger(), JsonLogger()]
    if cfg.ray.tune.tensorboard:
        cbs.append(_tensorboard_callback(tensorboard_dir(out), phase))
    if cfg.ray.tune.mlflow.enabled:
        cbs.append(_mlflow_callback(cfg, out, phase))
    return cbs


def check_logging(cfg: Config, out) -> None:
    """Before any work: MLflow logging that is on must be able to start (its module, its store)."""
    if cfg.ray.tune.mlflow.enabled:
        _mlflow_callback(cfg, out, "check")
