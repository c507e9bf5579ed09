"""m2das: M2D-AS pre-training that survives preemption."""

from m2das.runfolder import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OK, EXIT_RESUMABLE  # noqa: F401  (the exit codes)

__version__ = "0.1.0"
