"""Where a finished sweep's wall clock went, from its own tables (timeline.parquet, trials.parquet).

    .venv/bin/python benchmarks/job_overhead.py runs/local [--json FILE]

Per stage: wall seconds. For the trials: the stage's wall clock against the trials' own time, split
into fine-tuning (finetune_wall_s: training steps and evaluations) and the rest of each attempt
(task data, initialization, checkpoints, the final report); and the time a trial slot sat idle
between trials (Tune's scheduling and its actors' start, as seen from the trials: slots =
ray.tune.max_concurrent)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd


def overhead(out: Path, slots: int | None = None) -> dict:
    tl = pd.read_parquet(out / "timeline.parquet")
    trials = pd.read_parquet(out / "trials.parquet")
    if slots is None:
        import yaml

        cfg = yaml.safe_load((out / "config.yaml").read_text())
        slots = int(cfg["ray"]["tune"]["max_concurrent"])
    res = {"wall_s": float(tl.end_s.max()), "stages": {}}
    for stage, g in tl.groupby("stage", sort=False):
        res["stages"][stage] = {
            "n": int(len(g)),
            "first_start_s": float(g.start_s.min()),
            "last_end_s": float(g.end_s.max()),
            "busy_s": float((g.end_s - g.start_s).sum()),
        }
    t = tl[tl.stage == "trial"]
    if len(t):
        span = float(t.end_s.max() - t.start_s.min())
        attempt = float((t.end_s - t.start_s).sum())
        ok = trials[trials.status.isin(["finished", "stopped_early"])]
        finetune = float(ok.finetune_wall_s.sum()) if "finetune_wall_s" in ok else float("nan")
        res["trials"] = {
            "n": int(len(t)),
            "span_s": span,
            "slots": slots,
            "attempt_s": attempt,
            "finetune_s": finetune,
            "rest_of_attempt_s": attempt - finetune,
            "idle_slot_s": max(0.0, span * slots - attempt),
            "per_trial_s": attempt / len(t),
            "per_trial_finetune_s": finetune / len(t),
            "per_trial_idle_s": max(0.0, span * slots - attempt) / len(t),
        }
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="a finished sweep's output folder")
    p.add_argument("--slots", type=int, default=None, help="trials at once (default: ray.tune.max_concurrent)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    res = overhead(Path(a.output), a.slots)
    print(f"wall clock {res['wall_s']:.0f} s from the ancestor's start to the last trial's end")
    for stage, s in res["stages"].items():
        print(
            f"  {stage:<11} {s['n']:>3} pieces, {s['first_start_s']:6.0f} s -> {s['last_end_s']:6.0f} s, "
            f"busy {s['busy_s']:.0f} s"
        )
    if "trials" in res:
        t = res["trials"]
        print(
            f"trials: {t['n']} over {t['span_s']:.0f} s on {t['slots']} slots; per trial {t['per_trial_s']:.1f} s "
            f"(fine-tuning {t['per_trial_finetune_s']:.1f} s, the rest of the attempt "
            f"{t['rest_of_attempt_s'] / t['n']:.1f} s), slot idle between trials {t['per_trial_idle_s']:.1f} s"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
