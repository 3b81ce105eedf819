"""Results tables, written atomically as Parquet (readable by pandas, duckdb, polars, no project code).

trials.parquet   one row per trial: finished, cut by ASHA, errored or superseded (columns: TrialRow; docs/files.md)
history.parquet  one row per trial per evaluation ("epoch")
stages.parquet   measured cost of each stage (ancestor, each extraction, each descendant pre-training)
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import pandas as pd

from mmlg_ray.atomic import atomic_path

log = logging.getLogger("mmlg_ray")
STATUSES = ("finished", "stopped_early", "error", "superseded", "running")
_NAN = float("nan")


# int columns a trial is known by: never filled in (a missing count, NaN from a table, reads as 0)
IDENTITY = ("seed", "depth", "width")


def _coerce(name: str, kind: str, v):
    if kind == "bool" and isinstance(v, str):
        if v.lower() not in ("true", "false"):
            raise ValueError(v)
        return v.lower() == "true"
    if kind == "int" and isinstance(v, float) and math.isnan(v) and name not in IDENTITY:
        return 0
    if kind == "int" and isinstance(v, float) and not float(v).is_integer():
        raise ValueError(v)
    return {"int": int, "float": float, "bool": bool, "str": str}[kind](v)


@dataclass
class TrialRow:
    """One row of trials.parquet: one trial of a grid cell at one seed and one set of hyper-parameters,
    how it ended, what it cost and what it scored. The columns are these fields in this order, then
    `final_<metric>` and `best_<metric>` (every metric of the last evaluation, and of the evaluation with
    the best validation score), sorted; `cell` and `history` are not columns (history.parquet holds
    the evaluations). Both backends build it, so the table has the same columns and types whichever
    ran it, an errored trial included."""

    # what it is
    trial: str
    trial_id: str = ""
    phase: str = ""  # search | seeds
    candidate: int = -1  # the shape's common candidate (search), the chosen one (seeds)
    method: str = ""
    arm: str = ""
    extraction: str = ""
    pt_budget: float = 0.0
    modality: str = ""
    task: str = ""
    dataset: str = ""
    depth: int = 0
    width: int = 0
    image_depth: int = 0
    text_depth: int = 0
    image_width: int = 0
    text_width: int = 0
    heads: int = 0
    params: int = 0
    seed: int = 0
    lr: float = _NAN
    weight_decay: float = _NAN
    score_metric: str = ""
    workers: int = 1
    # how it ended
    status: str = "finished"
    error: str = ""
    stopped_early: bool = False
    # what it cost
    epochs: int = 0
    steps: int = 0
    resumed_from_step: int = 0
    preemptions: int = 0  # restarts after its node was preempted (drained as such): no failure counted
    retries: int = 0  # restarts after a failure (a node lost without notice, a crash): each spends ray.max_failures
    lost_device_s: float = 0.0  # work thrown away by its restarts and final error (paid for: in the spend)
    started_at: float = _NAN
    ended_at: float = _NAN
    finetune_wall_s: float = 0.0
    finetune_device_s: float = 0.0
    finetune_flops: float = 0.0
    pretrain_wall_s: float = 0.0
    pretrain_device_s: float = 0.0
    pretrain_flops: float = 0.0
    skipped_samples: int = 0
    # what it scored
    val_score: float = _NAN
    linear_probe_init: float = _NAN
    final: dict = field(default_factory=dict)  # final_<metric>
    best: dict = field(default_factory=dict)  # best_<metric>
    cell: str = ""  # Cell.key (not a column)
    history: list = field(default_factory=list)  # one dict per evaluation (history.parquet)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"trial {self.trial}: status {self.status!r} is not one of {STATUSES}")
        for f in fields(self):
            if f.type in ("int", "float", "bool", "str"):
                v = getattr(self, f.name)
                try:
                    setattr(self, f.name, _coerce(f.name, f.type, v))
                except (TypeError, ValueError, OverflowError) as e:
                    raise ValueError(f"trial {self.trial}: {f.name}={v!r} is not {f.type}") from e
        self.final = {k: float(v) for k, v in self.final.items()}
        self.best = {k: float(v) for k, v in self.best.items()}

    def record(self) -> dict:
        """The flat row: the columns of trials.parquet (final_* / best_* spread out)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("final", "best", "cell", "history")}
        out.update({f"final_{k}": v for k, v in sorted(self.final.items())})
        out.update({f"best_{k}": v for k, v in sorted(self.best.items())})
        return out

    def with_(self, **kw) -> "TrialRow":
        return replace(self, **kw)

    @classmethod
    def of(cls, flat: dict, strict: bool = True, **kw) -> "TrialRow":
        """A row from a flat record (as `record()` writes it, or a trial's report to Tune); `kw` sets
        fields on top. A key that is neither a field nor final_* / best_* is an error, naming it: the
        table's columns are declared here, and nowhere else. strict=False (a sweep's end, reading what
        another Ray release may add to its reports) drops such keys with one warning instead."""
        names = {f.name for f in fields(cls)} - {"final", "best"}
        own, final, best, unknown = {}, {}, {}, []
        for k, v in {**flat, **kw}.items():
            if k in names:
                own[k] = v
            elif k.startswith("final_"):
                final[k[6:]] = v
            elif k.startswith("best_"):
                best[k[5:]] = v
            elif strict:
                raise ValueError(
                    f"trial row: {k!r} is not a column of trials.parquet (mmlg_ray.engine.results.TrialRow)"
                )
            else:
                unknown.append(k)
        if unknown and not _DROPPED.issuperset(unknown):
            _DROPPED.update(unknown)
            log.warning("trials.parquet: left out keys that are not its columns: %s", ", ".join(sorted(unknown)))
        return cls(**own, final=final, best=best)


_DROPPED: set = set()  # keys a sweep's reports held that are not columns (warned about once)


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def history_frame(rows: list[TrialRow]) -> pd.DataFrame:
    recs = []
    for r in rows:
        for h in r.history:
            recs.append(
                {
                    "trial": r.trial,
                    "method": r.method,
                    "modality": r.modality,
                    "depth": r.depth,
                    "width": r.width,
                    "seed": r.seed,
                    **{k: float(v) for k, v in h.items()},
                }
            )
    return pd.DataFrame(recs)


def trials_frame(rows: list[TrialRow]) -> pd.DataFrame:
    """trials.parquet: the declared columns in order (also with no rows), then final_* / best_* sorted."""
    base = [k for k in TrialRow("").record()]
    recs = [r.record() for r in rows]
    extra = sorted({k for rec in recs for k in rec} - set(base))
    trials = pd.DataFrame(recs, columns=base + extra)
    if len(trials):
        trials = trials.sort_values("trial", kind="stable").reset_index(drop=True)
    return trials


def write_tables(out: Path, rows: list[TrialRow], stages: list[dict]) -> dict[str, Path]:
    out = Path(out)
    trials = trials_frame(rows)
    return {
        "trials": write_parquet(trials, out / "trials.parquet"),
        "history": write_parquet(history_frame(rows), out / "history.parquet"),
        "stages": write_parquet(pd.DataFrame(stages), out / "stages.parquet"),
    }


def write_run_files(out: Path, cfg, ancestor=None) -> None:
    """config.yaml (the exact config of the run) and ancestor.json, for the report's provenance."""
    from mmlg_ray.atomic import atomic_path, write_json
    from mmlg_ray.config import dump_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(dump_config(cfg))
    if ancestor is not None:
        meta = getattr(ancestor, "meta", None) or {}
        own = {k: v for k, v in meta.items() if k.endswith("_val")}
        own.update(meta.get("corpus_test") or {})  # its corpus's held-out test split, per part
        write_json(
            out / "ancestor.json",
            {
                "source": ancestor.source,
                "fingerprint": ancestor.fingerprint,
                "spec": ancestor.spec.model_dump(),
                "cost": ancestor.cost,
                "own_retrieval": own,
            },
        )
