"""Stop requests from the cluster, turned into a flag the training loop checks.

Nothing is saved inside a handler: a save in the middle of backward or
optimizer.step would capture a half-updated state. The handlers that were
installed before ours (for instance submitit's requeue handler) are kept and
called after the checkpoint is safely on disk.
"""

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    def __init__(self, signals=STOP_SIGNALS):
        self.signals = signals
        self.signum = None
        self.previous = {}

    def install(self) -> "StopRequest":
        for s in self.signals:
            self.previous[s] = signal.getsignal(s)
            signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum, _frame):
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def hand_over(self) -> None:
        """Call the handler that was there before ours (submitit requeues in it)."""
        previous = self.previous.get(self.signum)
        if callable(previous):
            previous(self.signum, None)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}
