"""A stop signal during start-up is held for the trainer, not fatal and not lost."""

import subprocess
import sys

CODE = """
import os, signal, sys, time
from m2das.signals import StopRequest, hold_early
hold_early()
os.kill(os.getpid(), signal.SIGUSR2)   # SIGUSR2's default would end the process here
time.sleep(0.2)
stop = StopRequest().install()
print(stop.name, stop.previous[signal.SIGUSR2] == signal.SIG_DFL)
stop.restore()
"""


def test_a_signal_before_the_handlers_is_handed_to_the_stop_request():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SIGUSR2", "True"]  # and the handler before the hold is the one handed over to


def test_without_a_signal_nothing_is_requested():
    code = CODE.replace("os.kill(os.getpid(), signal.SIGUSR2)", "pass")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["None", "True"], out.stderr
