"""SIGTERM stops the job as Ctrl-C does (mmlg_ray.stopping); the sweep's SIGTERM test is in test_ray."""

import os
import signal

import pytest

from mmlg_ray import stopping


def test_sigterm_goes_to_tunes_graceful_stop_inside_a_tune_run_and_raises_elsewhere():
    before = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)
    seen = []
    try:
        with stopping.sigterm_as_ctrl_c():
            # a handler a framework left behind (Tune's, Ray Train's) is not asked outside a Tune run
            signal.signal(signal.SIGINT, lambda s, f: seen.append("stale"))
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
            with stopping.tune_run():
                signal.signal(signal.SIGINT, lambda s, f: seen.append("tune"))  # as Tune's fit() installs
                os.kill(os.getpid(), signal.SIGTERM)
            assert signal.getsignal(signal.SIGINT) is not None and seen == ["tune"]
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init's own handler does to ours
            stopping.reinstall()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, before_int)
    assert signal.getsignal(signal.SIGTERM) is before
    stopping.reinstall()  # outside the block: does nothing
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_tune_run_puts_back_the_sigint_handler_from_before():
    before = signal.getsignal(signal.SIGINT)
    with stopping.tune_run():
        signal.signal(signal.SIGINT, lambda s, f: None)  # Tune never uninstalls its own
    assert signal.getsignal(signal.SIGINT) is before
