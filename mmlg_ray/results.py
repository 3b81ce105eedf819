"""Results tables, written atomically as Parquet (readable by pandas, duckdb, polars, no project code).

trials.parquet   one row per finished trial (columns documented in README)
history.parquet  one row per trial per evaluation ("epoch")
stages.parquet   measured cost of each stage (ancestor, each extraction, each descendant pre-training)
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .atomic import atomic_path


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def history_frame(rows: list[dict]) -> pd.DataFrame:
    recs = []
    for r in rows:
        for h in r.get("history", []):
            recs.append({"trial": r["trial"], "method": r["method"], "modality": r["modality"],
                         "depth": r["depth"], "width": r["width"], "seed": r["seed"],
                         **{k: float(v) for k, v in h.items()}})
    return pd.DataFrame(recs)


def write_tables(out: Path, rows: list[dict], stages: list[dict]) -> dict[str, Path]:
    out = Path(out)
    trials = pd.DataFrame([{k: v for k, v in r.items() if k != "history"} for r in rows])
    if len(trials):
        trials = trials.sort_values("trial", kind="stable").reset_index(drop=True)
    return {
        "trials": write_parquet(trials, out / "trials.parquet"),
        "history": write_parquet(history_frame(rows), out / "history.parquet"),
        "stages": write_parquet(pd.DataFrame(stages), out / "stages.parquet"),
    }


def write_run_files(out: Path, cfg, ancestor=None) -> None:
    """config.yaml (the exact config of the run) and ancestor.json, for the report's provenance."""
    from .atomic import atomic_path, write_json
    from .config import dump_config
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(dump_config(cfg))
    if ancestor is not None:
        meta = getattr(ancestor, "meta", None) or {}
        own = {k: v for k, v in meta.items() if k.endswith("_val")}
        own.update(meta.get("corpus_test") or {})  # its corpus's held-out test split, per part
        write_json(out / "ancestor.json", {"source": ancestor.source, "fingerprint": ancestor.fingerprint,
                                           "spec": ancestor.spec.model_dump(), "cost": ancestor.cost,
                                           "own_retrieval": own})
