"""The typed trial row: trials.parquet's columns are declared once, whichever backend ran the trials."""

import math

import pandas as pd
import pytest

from mmlg_ray.job import error_row
from mmlg_ray.results import TrialRow, trials_frame, write_tables


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
    # Tune hands back numpy / float values; a missing int (NaN) reads as 0
    row = TrialRow.of({"trial": "t", "depth": 2.0, "seed": float("nan"), "lr": "0.001", "stopped_early": 0})
    assert row.depth == 2 and isinstance(row.depth, int) and row.seed == 0
    assert row.lr == 0.001 and row.stopped_early is False


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
