"""What a sweep prints and logs besides its tables: one tiny sweep (search + seeds phases, on the
session's Ray instance, as a separate driver process the way a submitted job runs) is read back for
its TensorBoard event files, its MLflow runs and its captured log."""

import os
import re
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_REPEATS = 3


@pytest.fixture(scope="module")
def sweep_run(tiny_overrides, ray_address, tmp_path_factory):
    """One tiny sweep with TensorBoard (default) and MLflow on a file store: (output folder, MLflow
    URI, the driver's stdout + stderr)."""
    tmp = tmp_path_factory.mktemp("logs")
    out, mlruns = tmp / "sweep", (tmp / "mlruns").as_uri()
    sets = tiny_overrides + [
        f"ray.address={ray_address}",
        "descendants.grid.method=[mmlg,pt_ft]",
        "descendants.seeds=[0,1]",
        "descendants.pretrain_steps=10",
        "ray.tune.num_samples=1",
        "ray.tune.mlflow.enabled=true",
        f"ray.tune.mlflow.tracking_uri={mlruns}",
        "ray.tune.mlflow.experiment=logs-test",
    ]
    argv = [sys.executable, str(ROOT / "jobs/sweep.py"), "--output", str(out)] + sum((["--set", s] for s in sets), [])
    # the pt_ft shape takes 25 s more than it needs: mmlg's trials (no pre-trained shape) certainly start
    # while it pre-trains, if the sweep lets them
    env = {**os.environ, "MMLG_HOLD_PRETRAIN_S": "25"}
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=env)
    (tmp / "sweep.log").write_text(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return out, mlruns, proc.stdout


def read_scalars(event_file: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of a TensorBoard event file: TFRecord framing (length, masked CRC,
    payload, masked CRC), each payload an Event protobuf; the CRCs are checked."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data: bytes) -> int:
        c = crc32c(data)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    raw, pos, scalars = event_file.read_bytes(), 0, {}
    while pos < len(raw):
        head = raw[pos : pos + 8]
        (n,) = struct.unpack("<Q", head)
        assert struct.unpack("<I", raw[pos + 8 : pos + 12])[0] == masked(head)
        data = raw[pos + 12 : pos + 12 + n]
        assert struct.unpack("<I", raw[pos + 12 + n : pos + 16 + n])[0] == masked(data)
        pos += 16 + n
        ev = Event.FromString(data)
        for v in ev.summary.value:
            if v.WhichOneof("value") == "simple_value":
                scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return scalars


def test_tensorboard_event_files_hold_every_trials_score(sweep_run):
    out, _, _ = sweep_run
    trials = pd.read_parquet(out / "trials.parquet")
    runs = sorted(p for p in (out / "tensorboard").glob("*/*") if p.is_dir())
    # one folder per trial, named by phase and cell: tensorboard/search/mmlg-image-d2-w64-seed0-<id>
    assert len(runs) == len(trials) == 4  # per cell (mmlg, pt_ft@1x): 1 search trial, 1 seeds trial
    assert {p.parent.name for p in runs} == {"search", "seeds"}
    assert all(re.fullmatch(r"(mmlg|pt_ft_1x)-image-d2-w64-seed[01]-\w+", p.name) for p in runs), runs
    finals = {}
    for run in runs:
        files = list(run.glob("events.out.tfevents.*"))
        assert files, run
        scalars = {}
        for f in files:
            for tag, pts in read_scalars(f).items():
                scalars.setdefault(tag, []).extend(pts)
        score = sorted(scalars["ray/tune/score"])
        assert score and all(0 <= v <= 100 for _, v in score)
        finals[run.name.rsplit("-", 1)[1]] = score[-1][1]
    # the last score an event file holds is the trial's final score in trials.parquet
    for _, row in trials.iterrows():
        assert finals[row.trial_id] == pytest.approx(row.final_score, rel=1e-5, abs=1e-4)
    # nothing written beside the trials' checkpoints under the Ray storage path
    assert not list((out / "ray").rglob("events.out.tfevents.*"))


def test_mlflow_records_a_run_per_trial_with_its_score(sweep_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to
    out, uri, _ = sweep_run
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("logs-test")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    trials = pd.read_parquet(out / "trials.parquet")
    assert len(runs) == len(trials)
    assert {r.data.tags["phase"] for r in runs} == {"search", "seeds"}
    assert all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        history = client.get_metric_history(r.info.run_id, "score")
        assert history and all(0 <= m.value <= 100 for m in history)
    search = [r for r in runs if r.data.tags["phase"] == "search"]
    assert all({"lr", "weight_decay", "cell"} <= set(r.data.params) for r in search)


def _lines_outside_status_tables(text: str) -> list[str]:
    """The log's lines without Tune's status tables (each from '== Status ==' to the next blank
    line), each stripped of its time stamp and of Ray's '(process pid=N, ip=...)' prefix."""
    kept, in_table = [], False
    for line in text.splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        if line.startswith("== Status =="):
            in_table = True
        if in_table:
            in_table = bool(line.strip())
            continue
        line = re.sub(r"^\(\S+ pid=\d+(, ip=[\d.]+)?\)\s*", "", line)
        line = re.sub(r"^(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\d(,\d+)?\s*", "", line)
        if line.strip():
            kept.append(line.strip())
    return kept


def test_the_log_has_stage_lines_status_tables_and_no_repeated_lines(sweep_run):
    """Readable log: a start and a done line per stage; Tune's status table (the classic reporter),
    no per-trial result or config box; outside the status tables no line (time stamp and Ray's
    process prefix removed) more than MAX_REPEATS times."""
    _, _, text = sweep_run
    for stage in ("ancestor", "extraction mmlg", "pretrain", "trials", "tables", "report"):
        assert re.search(rf"stage {stage}: started", text), stage
        assert re.search(rf"stage {stage}: done in \d", text), stage
    assert "== Status ==" in text
    # the new output engine's per-trial boxes and lines, the classic engine's result dumps
    assert not re.search(r"^(Trial \S+ (result|config|started with|completed after)|Result for )", text, re.M)
    assert "╭" not in text and "│" not in text
    lines = _lines_outside_status_tables(text)
    repeated = {ln: n for ln, n in Counter(lines).items() if n > MAX_REPEATS}
    assert not repeated, repeated
    # a training loop in a trial prints at most a few progress lines, and only rank 0
    assert not re.search(r"\[extract/rank1\]", text)
    # the known noise of every run, each kept out by a named setting in mmlg_ray/distributed/logs.py
    for noise in (
        "Checkpoint successfully created",
        "Reporting training result",
        "snapshotting has been triggered",
        "A new study created",
        "unresolved search space",
        "shm_comm_op built successfully",
        "all_gather_into_tensor",
        "Loading checkpoint shards",
        "Requesting resources",
    ):
        assert noise not in text, noise


# --------------------------------------------------------------------------- fast, no Ray
def test_progress_prints_a_few_lines_per_loop_when_limited():
    from mmlg_ray.method.train import Progress

    printed = []
    p = Progress("t", 100, printer=printed.append, max_lines=4)
    for step in range(1, 101):
        p(step, {"loss": 1.0})
    assert [int(re.search(r"step (\d+)/", s).group(1)) for s in printed] == [25, 50, 75, 100]
    # one Progress over a loop run in chunks (fine-tuning between evaluations, extraction between
    # checkpoints): its total, not the chunk's, and a resumed start
    printed.clear()
    p = Progress("t", 120, start=40, printer=printed.append, max_lines=4)
    for step in (50, 60, 80, 100, 120):
        p(step, {})
    assert [int(re.search(r"step (\d+)/120", s).group(1)) for s in printed] == [60, 80, 100, 120]
    printed.clear()
    silent, every = Progress("t", 10, printer=printed.append, max_lines=0), Progress("t", 10, printer=printed.append)
    for step in range(1, 11):
        silent(step, {})
    assert printed == []
    for step in range(1, 11):
        every(step, {})
    assert len(printed) == 10


def test_logging_settings_are_operational_not_the_experiments_identity():
    from mmlg_ray.config import load_config

    base = load_config(None)
    other = load_config(
        None,
        [
            "ray.tune.tensorboard=false",
            "ray.tune.status_every_s=5",
            "ray.tune.mlflow.enabled=true",
            "ray.tune.mlflow.tracking_uri=http://mlflow:5000",
        ],
    )
    assert other.ray.tune.mlflow.enabled and not other.ray.tune.tensorboard
    assert other.experiment_fingerprint() == base.experiment_fingerprint()  # --resume continues it
    assert load_config(None, ["ray.tune.num_samples=3"]).experiment_fingerprint() != base.experiment_fingerprint()


def test_mlflow_asked_for_without_its_module_stops_before_any_work(tiny_overrides, tmp_path, monkeypatch, capsys):
    from jobs import sweep as sweep_job

    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError, as when not installed
    out = tmp_path / "out"
    sets = tiny_overrides + ["ray.tune.mlflow.enabled=true"]
    assert sweep_job.main(["--output", str(out)] + sum((["--set", s] for s in sets), [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: ray.tune.mlflow.enabled:") and "mlflow-skinny" in err
    assert not out.exists()


def test_mlflow_store_defaults_to_a_sqlite_file_beside_the_results(tmp_path, monkeypatch):
    from mmlg_ray.config import load_config
    from mmlg_ray.distributed.logs import mlflow_tracking_uri
    from mmlg_ray.errors import UserError

    cfg = load_config(None, ["ray.tune.mlflow.enabled=true"])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_tracking_uri(cfg, tmp_path / "out") == f"sqlite:///{(tmp_path / 'out').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert mlflow_tracking_uri(cfg, tmp_path / "out") is None  # MLflow reads its own variable
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(UserError, match="ray.tune.mlflow.tracking_uri"):
        mlflow_tracking_uri(cfg, "s3://bucket/run")
    cfg = load_config(None, ["ray.tune.mlflow.tracking_uri=http://mlflow:5000"])
    assert mlflow_tracking_uri(cfg, "s3://bucket/run") == "http://mlflow:5000"


def test_trials_that_need_no_pretrained_shape_run_while_the_shapes_pretrain(sweep_run):
    """Phases start when their inputs exist: mmlg's trials start while pt_ft's shape pre-trains; each
    pt_ft trial starts only once its shape is written. The report's stage timeline shows it."""
    out, _, _ = sweep_run
    tl = pd.read_parquet(out / "timeline.parquet")
    (shape_end,) = tl[tl.stage == "pretrain"].end
    trials = pd.read_parquet(out / "trials.parquet")
    assert (trials[trials.method == "pt_ft"].started_at >= shape_end).all()
    assert (trials[trials.method == "mmlg"].started_at < shape_end).any()
    assert {"ancestor", "extraction", "pretrain", "trial"} == set(tl.stage)
    from mmlg_ray.report import load_report_data
    from mmlg_ray.report.provenance import sec_timeline
    from mmlg_ray.report.texts import title

    (sec,) = sec_timeline(load_report_data(out))
    assert [b.key for b in sec.blocks if b.kind == "para"] == ["timeline", "timeline_early"]
    assert title("timeline") in (out / "report" / "report.html").read_text()
