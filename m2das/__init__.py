"""m2das: M2D-AS pre-training that survives preemption."""

from m2das.runfolder import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OK, EXIT_RESUMABLE  # noqa: F401  (the exit codes)

__version__ = "0.1.0"


def __getattr__(name):
    """`m2das.load_encoder` without importing torch at `import m2das` (status and launchers stay light)."""
    if name == "load_encoder":
        from m2das.downstream.encoder import load_encoder

        return load_encoder
    raise AttributeError(f"module 'm2das' has no attribute {name!r}")
