"""A graceful stop on SIGTERM: `ray job stop`, Kubernetes and most schedulers send SIGTERM, and the job
stops as on Ctrl-C. The signal is handed to whatever handles SIGINT at that moment: during a sweep that
is Ray Tune's graceful stop (the experiment's state is saved, the trials are stopped; a second signal
skips that), before or after it KeyboardInterrupt.

ray.init installs Ray's own fatal-signal handler for SIGTERM in the driver (it prints a stack and exits
15), over any handler set before; `reinstall()` is called after ray.init to put this one back."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger("mmlg_ray")
_active = False


def _on_term(signum, frame):
    log.warning("SIGTERM received: stopping as Ctrl-C would")
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job of a shell) or not set from Python
        raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_ctrl_c():
    """Within this block (main thread only: signal handlers live there), SIGTERM stops as Ctrl-C does."""
    global _active
    if not _main_thread():
        yield
        return
    before, _active = signal.signal(signal.SIGTERM, _on_term), True
    try:
        yield
    finally:
        _active = False
        signal.signal(signal.SIGTERM, before)


def reinstall() -> None:
    """Inside sigterm_as_ctrl_c, after something (ray.init) replaced the process's SIGTERM handler at the C
    level, where Python's signal.getsignal cannot see it: set ours again."""
    if _active and _main_thread():
        signal.signal(signal.SIGTERM, _on_term)
