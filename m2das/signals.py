"""Stop requests from the cluster, turned into a flag the training loop checks.

Nothing is saved inside a handler: a save in the middle of backward or
optimizer.step would capture a half-updated state. The handlers that were
installed before ours (for instance submitit's requeue handler) are kept and
called after the checkpoint is safely on disk.

A stop signal that arrives while the trainer is still starting (importing
torch, joining the process group) is held by `hold_early`, which `m2das train`
installs first thing, and handed to the StopRequest when it is installed: the
process neither dies from it (SIGUSR2's default is to terminate) nor loses it.

Ctrl-C (SIGINT, which torchrun forwards to its ranks) is a stop request too:
the first one saves at the next step boundary like SIGTERM; a second one
aborts at once (KeyboardInterrupt, exit 130), for a user who will not wait.
Before the StopRequest exists nothing is trained, so a Ctrl-C there ends the
command at once (StartInterrupted: one line, exit 130) instead of being held.
"""

import os
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
INTERRUPT = signal.SIGINT
EXIT_ABORTED = 128 + signal.SIGINT  # the shell's status for a process ended by Ctrl-C


class Aborted(KeyboardInterrupt):
    """A second Ctrl-C: stop now, without saving (the last checkpoint stays the resume point)."""


class StartInterrupted(BaseException):
    """A Ctrl-C before the StopRequest exists: nothing to save yet, so the command ends with one line and
    EXIT_ABORTED, not a traceback. Not an Exception, so no `except Exception` on its way (an import's
    fallback, the trainer's error reporting) mistakes it for an error and carries on."""


START_INTERRUPTED = "stopped before training started; nothing to save"

_early = {"signum": None, "previous": {}}


def _hold(signum, _frame):
    if _early["signum"] is None:
        _early["signum"] = signum


def _interrupt_early(_signum, _frame):
    raise StartInterrupted(START_INTERRUPTED)


def hold_early(signals=STOP_SIGNALS) -> None:
    """Remember the first stop signal until a StopRequest is installed, and turn a Ctrl-C until then into
    StartInterrupted (call before heavy imports). An ignored SIGINT (a launcher's choice) stays ignored."""
    if signal.getsignal(INTERRUPT) is signal.default_int_handler:
        _early["previous"][INTERRUPT] = signal.default_int_handler
        signal.signal(INTERRUPT, _interrupt_early)
    for s in signals:  # last: a held SIGTERM/SIGUSR* also tells an onlooker the Ctrl-C is taken care of
        _early["previous"][s] = signal.getsignal(s)
        signal.signal(s, _hold)


class StopRequest:
    """The first stop signal, kept for the loop to see at its next step boundary."""

    def __init__(self, signals=STOP_SIGNALS + (INTERRUPT,)):
        self.signals = signals
        self.signum = None
        self.own = None  # a stop the trainer asked of itself (its run lock was lost), in words
        self.interrupts = 0
        self.previous = {}

    def install(self) -> "StopRequest":
        for s in self.signals:
            current = signal.getsignal(s)
            # Behind the early hold: the handler before it is the one to hand over to.
            self.previous[s] = _early["previous"].get(s, current) if current in (_hold, _interrupt_early) else current
            signal.signal(s, self._on_signal)
        if self.signum is None and _early["signum"] in self.signals:
            self.signum = _early["signum"]
        _early["signum"] = None
        return self

    def _on_signal(self, signum, _frame):
        if signum == INTERRUPT:
            self.interrupts += 1
            if self.interrupts > 1:
                raise Aborted("a second Ctrl-C (SIGINT): stopped at once, without saving")
            # os.write: a print could re-enter the stream this handler interrupted.
            os.write(2, b"Ctrl-C: saving at the next step, then stopping; press Ctrl-C again to stop at once "
                        b"without saving\n")
        if self.signum is None:
            self.signum = signum

    def request(self, reason: str) -> None:
        """Stop at the next step boundary as on a signal (saved, exit 75), for `reason`; thread-safe enough:
        the loop only reads it."""
        if self.own is None:
            self.own = reason

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.own is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    @property
    def reason(self) -> str | None:
        """The request as a user reads it: "SIGTERM", "Ctrl-C (SIGINT)", the trainer's own reason, or None."""
        if self.own is not None and self.signum is None:
            return self.own
        if self.signum == INTERRUPT:
            return f"Ctrl-C ({self.name})"
        return self.name

    def hand_over(self) -> None:
        """Call the handler that was there before ours (submitit requeues in it)."""
        previous = self.previous.get(self.signum)
        if callable(previous) and previous is not signal.default_int_handler:  # that one would raise
            previous(self.signum, None)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}
