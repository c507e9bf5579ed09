"""`m2das bench startup`: a first start's list check on a long loose list, before and after, in one run.

It writes ROWS real small LMS files ([1, 80, 4] float32 `.npy`, 1,408 bytes, 1,000 per folder) and
their list, then times in a fresh process per variant what a first start does with them: read the
list (`read_list`) and check every file header, either the way before (`ThreadPoolExecutor.map`,
which creates every future before the first result) or `validate` (a bounded queue of chunks taken
in list order). Each process reports its own peak RSS (getrusage), the seconds of both parts and
when the first progress line came. The variants alternate over the repeats.
"""

import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from m2das.cliargs import Parser
from m2das.datafolder import LMS_DIR, WEIGHTED_LIST
from m2das.machine import cpu_name, usable_cores

FRAMES = 4
PER_FOLDER = 1000
VARIANTS = ("before", "bounded")


def write_rows(root: Path, rows: int) -> Path:
    """`rows` identical valid LMS files under root/LMS_DIR/NNNN/ and root/WEIGHTED_LIST naming them."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.zeros((1, 80, FRAMES), dtype=np.float32))
    blob = buf.getvalue()
    with open(root / WEIGHTED_LIST, "w") as csv:
        csv.write("file_name,label,weight\n")
        for start in range(0, rows, PER_FOLDER):
            folder = f"{LMS_DIR}/{start // PER_FOLDER:04d}"
            (root / folder).mkdir(parents=True)
            for i in range(start, min(start + PER_FOLDER, rows)):
                name = f"{folder}/clip{i:07d}.npy"
                fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, blob)
                os.close(fd)
                csv.write(f"{name},/m/{i % 527},1.0\n")
    return root / WEIGHTED_LIST


def check_before(samples, freq_bins: int, progress, workers: int = 16) -> None:
    """The check as it was: pool.map over every name (its chunksize is ignored by threads)."""
    from m2das.data.dataset import check_file

    def check(name):
        return name, check_file(samples.root / name, freq_bins)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for n, _ in enumerate(pool.map(check, samples.files, chunksize=256), 1):
            if n % 10000 == 0 or n == len(samples):
                progress(n, len(samples))


def child(variant: str, csv: str, root: str) -> dict:
    """One variant in this process: list read, then every header checked; this process's peak RSS."""
    from m2das.data.dataset import read_list, validate

    t0 = time.perf_counter()
    samples = read_list(csv, root)
    t1 = time.perf_counter()
    first = []

    def progress(n, total):
        if not first:
            first.append(time.perf_counter() - t1)

    if variant == "before":
        check_before(samples, 80, progress)
    else:
        validate(samples, csv, 80, progress=progress)
    t2 = time.perf_counter()
    return {"read_s": t1 - t0, "check_s": t2 - t1, "first_progress_s": first[0],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_variant(variant: str, csv: Path, root: Path) -> dict:
    code = ("import json, sys; from m2das.tools.bench_startup import child; "
            "print(json.dumps(child(*sys.argv[1:])))")
    out = subprocess.run([sys.executable, "-c", code, variant, str(csv), str(root)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = Parser(prog="m2das bench startup", description=__doc__)
    p.add_argument("--rows", type=int, default=2_000_000, help="files in the list (default 2,000,000)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternating (default 1)")
    p.add_argument("--dir", default=".", help="folder on the disk to measure (default: the current one)")
    args = p.parse_args(argv)
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores ({usable_cores()} usable), load average {load}")
    tmp = Path(tempfile.mkdtemp(dir=args.dir, prefix=".m2das-bench-startup-"))
    try:
        t0 = time.perf_counter()
        csv = write_rows(tmp, args.rows)
        print(f"wrote {args.rows:,} files [1, 80, {FRAMES}] and their list in {time.perf_counter() - t0:.0f} s "
              f"(the page cache holds them: the seconds below are the check's CPU, not a cold disk)")
        runs = {v: [] for v in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                runs[variant].append(run_variant(variant, csv, tmp))
        print(f"{'variant':<10}{'peak RSS MB':>12}{'read list s':>13}{'check s':>9}{'first progress s':>18}")
        for variant, results in runs.items():
            med = {k: statistics.median(r[k] for r in results) for k in results[0]}
            print(f"{variant:<10}{med['peak_rss_mb']:>12.0f}{med['read_s']:>13.1f}{med['check_s']:>9.1f}"
                  f"{med['first_progress_s']:>18.1f}")
        print(f"variants: before = ThreadPoolExecutor.map over every row, bounded = m2das.data.dataset.validate "
              f"(medians of {args.repeats}; one process per run, 16 threads as a first start uses)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
