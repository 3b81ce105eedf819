"""SIGTERM stops the job as Ctrl-C does (mmlg_ray.stopping); the sweep's SIGTERM test is in test_ray."""

import os
import signal

import pytest

from mmlg_ray import stopping


def test_sigterm_is_handed_to_the_current_sigint_handler_then_restored():
    before = signal.getsignal(signal.SIGTERM)
    seen = []
    old_int = signal.signal(signal.SIGINT, lambda s, f: seen.append(s))  # as Ray Tune's graceful stop
    try:
        with stopping.sigterm_as_ctrl_c():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.signal(signal.SIGINT, signal.default_int_handler)  # outside Tune: KeyboardInterrupt
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init's own handler amounts to
            stopping.reinstall()
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, old_int)
    assert seen == [signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is before
    stopping.reinstall()  # outside the block: does nothing
    assert signal.getsignal(signal.SIGTERM) is before
