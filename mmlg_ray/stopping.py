"""A graceful stop on SIGTERM: `ray job stop`, Kubernetes and most schedulers send SIGTERM, and the job
stops as on Ctrl-C. Inside a Tune run (`tune_run()`), the signal goes to Tune's SIGINT handler: its
graceful stop saves the experiment's state and stops the trials; Tune then puts back the handler from
before, so a second signal raises KeyboardInterrupt and skips that. Anywhere else (the ancestor,
extraction, pre-training, the tables, the report) it raises KeyboardInterrupt at once: the SIGINT
handler there may be one a framework left behind (Tune never uninstalls its own; Ray Train's exits 0),
so it is not asked. Outputs are written to a temporary name and renamed: nothing is left half-written.

ray.init installs Ray's own SIGTERM handler in the driver (it exits 15), over any handler set before;
`reinstall()` is called after ray.init to put this one back."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger("mmlg_ray")
_active = False


_in_tune = False


def _on_term(signum, frame):
    log.warning("SIGTERM received: stopping as Ctrl-C would")
    handler = signal.getsignal(signal.SIGINT)
    if _in_tune and callable(handler):
        handler(signal.SIGINT, frame)  # Tune's graceful stop (the first time), then KeyboardInterrupt
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def tune_run():
    """Around a Tune `fit()`: SIGTERM goes to Tune's graceful stop; afterwards the SIGINT handler from
    before is put back (Tune leaves its own installed, which would swallow a later signal)."""
    global _in_tune
    before = signal.getsignal(signal.SIGINT) if _main_thread() else None
    _in_tune = True
    try:
        yield
    finally:
        _in_tune = False
        if before is not None:
            signal.signal(signal.SIGINT, before)


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
    """Inside sigterm_as_ctrl_c, after ray.init replaced the process's SIGTERM handler with its own (which
    exits 15): set ours again."""
    if _active and _main_thread():
        signal.signal(signal.SIGTERM, _on_term)
