"""One log line when a stage of the main job starts, one when it ends (with its wall time)."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("mmlg_ray")


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


class Stage:
    def __init__(self, name: str, detail: str = ""):
        self.name, self.t0 = name, time.perf_counter()
        log.info("stage %s: started%s", name, f" ({detail})" if detail else "")

    def done(self, detail: str = "") -> None:
        log.info(
            "stage %s: done in %s%s", self.name, _dur(time.perf_counter() - self.t0), f"; {detail}" if detail else ""
        )
