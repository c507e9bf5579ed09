#!/usr/bin/env python3
"""`python launch/submit.py ...` from a checkout (no install needed): the same command as `m2das submit`."""
import sys; from pathlib import Path; sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E702
from m2das.cluster.submit import main; sys.exit(main())  # noqa: E402,E702
