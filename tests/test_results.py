"""The typed trial row: trials.parquet's columns are declared once, whichever backend ran the trials."""

import math

import pandas as pd
import pytest

from mmlg_ray.engine.job import error_row
from mmlg_ray.engine.results import TrialRow, trials_frame, write_tables


def _finished(**kw):
    base = dict(
        trial="mmlg-image-d1-w64-s0-a1",
        trial_id="a1",
        cell="mmlg|image|1|64",
        method="mmlg",
        arm="mmlg",
        modality="image",
        depth=1,
        width=64,
        seed=0,
        lr=1e-3,
        weight_decay=0.1,
        val_score=50.0,
        final={"score": 48.0, "top1": 48.0},
        best={"score": 49.0, "step": 20},
        history=[{"step": 20, "score": 49.0}, {"step": 40, "score": 48.0}],
    )
    return TrialRow(**{**base, **kw})


def test_record_round_trips_and_spreads_metrics():
    row = _finished()
    rec = row.record()
    assert rec["final_score"] == 48.0 and rec["best_step"] == 20.0
    assert "history" not in rec and "cell" not in rec and "final" not in rec
    back = TrialRow.of(rec, cell=row.cell, history=row.history)
    assert back == row


def test_unknown_key_and_bad_values_fail_naming_them():
    with pytest.raises(ValueError, match="'scroe'"):
        TrialRow.of({"trial": "t", "scroe": 1.0})
    with pytest.raises(ValueError, match="status 'done'"):
        TrialRow(trial="t", status="done")
    with pytest.raises(ValueError, match="depth='deep'"):
        TrialRow(trial="t", depth="deep")


def test_types_are_coerced_from_a_tune_report():
    # Tune hands back floats and numpy values; a missing count (NaN) reads as 0, a missing seed is an error
    row = TrialRow.of({"trial": "t", "depth": 2.0, "steps": float("nan"), "lr": "0.001", "stopped_early": "False"})
    assert row.depth == 2 and isinstance(row.depth, int) and row.steps == 0
    assert row.lr == 0.001 and row.stopped_early is False
    for bad in ({"seed": float("nan")}, {"depth": 2.5}, {"steps": float("inf")}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            TrialRow.of({"trial": "t", **bad})
    # a sweep's end (another Ray release's keys) drops what is not a column instead
    assert TrialRow.of({"trial": "t", "_hostname": "h"}, strict=False).record()["trial"] == "t"


def test_table_has_every_column_even_when_every_trial_errored(tmp_path):
    job = {"cell": "scratch|text|2|128", "seed": 0, "lr": 1e-3, "weight_decay": 0.0, "phase": "search"}
    rows = [error_row(job, "local00000", RuntimeError("boom\nsecond line"))]
    write_tables(tmp_path, rows, [])
    df = pd.read_parquet(tmp_path / "trials.parquet")
    assert list(df.columns) == list(TrialRow("").record())
    assert df.loc[0, "status"] == "error" and df.loc[0, "error"] == "RuntimeError: boom"
    assert df.loc[0, "trial"] == "scratch-text-d2-w128-s0-local00000" and math.isnan(df.loc[0, "val_score"])
    assert df.dtypes["depth"].kind == "i" and df.dtypes["lr"].kind == "f"


def test_metric_columns_follow_the_declared_ones_sorted():
    df = trials_frame([_finished(), _finished(trial="b", final={"zeroshot_top1": 10.0})])
    declared = list(TrialRow("").record())
    assert list(df.columns[: len(declared)]) == declared
    assert list(df.columns[len(declared) :]) == [
        "best_score",
        "best_step",
        "final_score",
        "final_top1",
        "final_zeroshot_top1",
    ]


@pytest.mark.slow  # fine-tunes a trial
def test_a_trial_cut_short_keeps_its_last_reports_scores_and_end(tiny_cfg, tiny_ancestor):
    """The Ray executor's row of a trial ASHA cut after its first evaluation: built from that report
    (as run_trial sends it to Tune, plus Tune's own keys), its end time the report's."""
    from types import SimpleNamespace

    from mmlg_ray.engine.arms import Cell
    from mmlg_ray.distributed.tune import _rows
    from mmlg_ray.engine.pipeline import run_trial

    reports = []
    cell = Cell("image", 2, 64, "scratch")
    run_trial(tiny_cfg, cell, 0, ancestor=tiny_ancestor, on_eval=lambda step, m, snap: reports.append(dict(m)))
    first = reports[0]
    assert first["steps"] == 10 and "ended_at" not in first and "val_score" in first
    tune_keys = {
        "timestamp": 1234567.0,
        "training_iteration": 1,
        "time_total_s": 3.0,
        "pid": 1,
        "hostname": "h",
        "node_ip": "127.0.0.1",
        "date": "d",
        "done": False,
        "trial_id": "abc12345",
        "checkpoint_dir_name": None,
    }
    res = SimpleNamespace(
        metrics={**first, **tune_keys},
        error=None,
        path="/tmp/sweep/trial_fn_abc12345_1_cell=x_2026",
        config={"cell": cell.key, "phase": "search", "seed": 0, "lr": 1e-3, "weight_decay": 0.1, "candidate": 3},
        metrics_dataframe=pd.DataFrame([{**first, **tune_keys}]),
    )
    (row,) = _rows([res], SimpleNamespace(records={"abc12345": {"status": "stopped_early"}}))
    assert isinstance(row, TrialRow) and row.status == "stopped_early" and row.stopped_early
    assert row.ended_at == 1234567.0 and row.started_at > 0  # on the stage timeline
    assert row.trial == "scratch-image-d2-w64-s0-abc12345" and row.candidate == 3 and row.epochs == 1
    assert row.final["score"] == first["score"] and row.best["val_score"] == first["val_score"]
    assert row.val_score == first["val_score"] and row.steps == 10 and row.depth == 2
    assert not ({"timestamp", "pid", "training_iteration"} & set(row.record()))
