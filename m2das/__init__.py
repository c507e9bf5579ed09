"""m2das: M2D-AS pre-training that survives preemption."""

__version__ = "0.1.0"

# Exit code of a run that stopped on a signal after saving a resumable
# checkpoint (EX_TEMPFAIL: "interrupted, rerun the same command to resume").
EXIT_RESUMABLE = 75
# Exit code of a run stopped because the loss became non-finite: rerunning
# would fail the same way, so launchers must not requeue it.
EXIT_DIVERGED = 3
