"""StopRequest: a stop signal only sets a flag (which every rank then agrees on), the launcher's
copy of the same Ctrl-C is not a second one, a real second signal aborts at once with 130, and
the previous handlers come back."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from megatron_tsp.training.signals import STOP_SIGNALS, StopRequest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_signal_sets_the_flag_and_the_handlers_come_back(signum):
    before = signal.getsignal(signum)
    with StopRequest() as stop:
        assert stop.agreed() is None
        os.kill(os.getpid(), signum)  # delivered before os.kill returns (same thread)
        assert stop.agreed() == signum and stop.name == signal.Signals(signum).name
        os.kill(os.getpid(), signum)  # the launcher's copy, right after: ignored
        assert stop.agreed() == signum
    assert signal.getsignal(signum) is before


def test_a_second_ctrl_c_aborts_at_once():
    code = textwrap.dedent("""
        import os, signal, time
        from megatron_tsp.training import signals
        signals.SAME_SIGNAL_S = 0.05
        with signals.StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            print("first one only set the flag:", stop.name, flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        print("not reached", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == "first one only set the flag: SIGINT\n"
