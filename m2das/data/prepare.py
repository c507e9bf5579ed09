"""`m2das prepare`: a folder of AudioSet audio -> a training-ready data folder.

Steps (each restartable, each usable alone):
  lms     audio -> DATA/audioset_lms/<same relative path>.npy, float32 [1, 80, T],
          and DATA/lms_recipe.json: how they were made (another recipe is never mixed in)
  list    DATA/files_audioset.csv: every output that exists and loads
  labels  DATA/files_as_weighted.csv: labels and sampling weights from AudioSet's lists
  stats   DATA/norm_stats.json: normalisation mean/std (read by the trainer)

Every output is written atomically, existing LMS files are kept, and a file that
cannot be converted is recorded in DATA/prepare_failures.csv instead of stopping
the run, so a run killed at any moment is finished by running it again.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import os
import re
import signal
import sys
import time
from pathlib import Path

from m2das import machine
from m2das.cliargs import Parser
from m2das.data.convert import Converted, convert_batched, convert_cpu, existing_outputs, find_audio, log, \
    progress_bar
from m2das.data.labels import read_csv_rows, write_csv
from m2das.data.lmsfile import check_lms_file
from m2das.data.recipe import OTHER_RECIPE_OUTPUTS, RecipeError, describe_recipe, plan_recipe, recipe_record, \
    recorded_recipe, resampler_by_content
from m2das.datafolder import EVAL_LIST, FAILURES, FILE_LIST, LMS_DIR, METADATA_DIR, NORM_STATS, PREPARE_LOCK, \
    RECIPE_FILE, WEIGHTED_LIST
from m2das.fileio import write_json

STEPS = ("lms", "list", "labels", "stats")
DEFAULT_AUDIO_DIR = "/audio"
DEFAULT_DATA_DIR = "/data"
_TMP_ANY = re.compile(r"^\..+\.(csv|json)\..+\.tmp$")


class PrepareError(RuntimeError):
    """Fatal for the whole run; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- the lms step


def resolve_device(text: str) -> str:
    """The device the lms step runs on, as a string (m2das.machine's rule: auto, cpu, cuda[:N], gpu)."""
    try:
        return str(machine.resolve_device(text))
    except machine.DeviceError as e:
        container = " (in a container: start it with --gpus all)" if "visible" in str(e) else ""
        raise PrepareError(f"{e}{container}", 2) from None


def read_failures(data_dir) -> list[tuple[str, str]]:
    path = Path(data_dir) / FAILURES
    if not path.is_file():
        return []
    return [(r["file"], r["reason"]) for r in read_csv_rows(path) if r.get("file")]


def write_failures(data_dir, failures) -> Path:
    path = Path(data_dir) / FAILURES
    write_csv(path, ["file", "reason"], sorted(failures))
    return path


def _check_audio_dir(audio_dir: Path) -> None:
    if not audio_dir.is_dir():
        raise PrepareError(f"audio folder {audio_dir} does not exist; pass AUDIO_DIR or mount "
                           f"your audio there (docker run -v /path/to/audio:{DEFAULT_AUDIO_DIR})", 2)


def run_lms(audio_dir, data_dir, device: str = "auto", workers: int | None = None,
            batch_size: int = 32, progress: bool = True, batched: bool | None = None,
            reconvert: bool = False, resampler: str | None = None) -> dict:
    """Convert every audio file that has no output yet; record the ones that fail.

    `batched` (default: on a GPU) decodes and resamples in worker processes and
    runs STFT and mel in batches on `device`; otherwise each worker converts whole
    files. Either way the LMS recipe is recorded in DATA/lms_recipe.json, and a
    folder made with another recipe is refused unless `reconvert`, which converts
    its affected files again. `resampler` other than the default is for benchmarks.
    """
    from m2das.data.audio import RESAMPLER, lms_recipe

    audio_dir, data_dir = Path(audio_dir), Path(data_dir)
    _check_audio_dir(audio_dir)
    device = resolve_device(device)
    workers = machine.usable_cores() if workers is None else max(1, int(workers))
    resampler = resampler or RESAMPLER
    recipe = lms_recipe(resampler)
    jobs, clashes, ignored = find_audio(audio_dir, data_dir)
    done = existing_outputs(data_dir)
    try:
        # no record: the content tells the reference's LMS from old m2das's (see recipe.py)
        by_content = resampler_by_content(jobs, done) if done and not (data_dir / RECIPE_FILE).exists() else None
        record = recorded_recipe(data_dir, bool(done), by_content)
        redo, stale = plan_recipe(jobs, done, record, data_dir, recipe, reconvert, progress)
    except RecipeError as e:
        raise PrepareError(str(e), 2) from None
    redo_names = {j.out_rel for j in redo}
    if not done or (not stale and record.get("inferred")):
        write_json(data_dir / RECIPE_FILE, recipe_record(recipe))  # before the first new file
        record = recipe_record(recipe)
    todo = [j for j in jobs if j.out_rel not in done or j.out_rel in redo_names]
    summary = {"audio_files": len(jobs) + sum(not c[0].endswith("/") for c in clashes),
               "ignored_non_audio": ignored,
               "skipped_existing": len(jobs) - len(todo), "converted": 0, "failed": 0,
               "silent": 0, "hours_converted": 0.0, "device": device, "workers": workers,
               "reconverted": 0, "other_recipe_outputs": len(stale),
               "recipe": describe_recipe(recipe)}
    log(f"lms: {len(jobs)} audio files in {audio_dir}, {summary['skipped_existing']} already "
        f"converted, {len(todo)} to do on {device} ({workers} workers"
        f"{f', {len(redo)} of them again for the new recipe' if redo else ''})")
    failures = list(clashes)
    attempted: set = set()
    seconds = 0.0
    bar = progress_bar(len(todo), "lms", progress)

    def on_result(result: Converted):
        nonlocal seconds
        attempted.add(result.rel)
        if result.ok:
            summary["converted"] += 1
            if result.out in stale:
                stale.discard(result.out)
                summary["reconverted"] += 1
            summary["silent"] += int(result.silent)
            seconds += result.seconds
        else:
            failures.append((result.rel, result.error))
            bar.set_postfix(failed=len(failures), refresh=False)
        bar.update(1)

    started = time.monotonic()
    try:
        if not (device != "cpu" if batched is None else batched):
            convert_cpu(todo, workers, on_result, resampler)
        else:
            convert_batched(todo, workers, device, batch_size, on_result, resampler)
        if record["recipe"] != recipe or set(record.get(OTHER_RECIPE_OUTPUTS) or []) != stale:
            # every file of the old recipe that could be redone has been tried
            write_json(data_dir / RECIPE_FILE, recipe_record(recipe, stale))
        summary["other_recipe_outputs"] = len(stale)
    finally:
        bar.close()
        summary["failed"] = len(failures)
        summary["hours_converted"] = seconds / 3600.0
        summary["lms_seconds"] = time.monotonic() - started
        # an interrupted run keeps what earlier runs found about the files it did not reach
        unreached = {j.rel for j in todo} - attempted
        failures += [row for row in read_failures(data_dir) if row[0] in unreached]
        summary["failures_file"] = str(write_failures(data_dir, failures))
    for rel, reason in sorted(failures)[:5]:
        log(f"  failed: {audio_dir / rel}: {reason}")
    if len(failures) > 5:
        log(f"  ... {len(failures) - 5} more in {summary['failures_file']}")
    return summary


# ---------------------------------------------------------------- list, labels, stats


def write_file_list(data_dir, progress: bool = True) -> dict:
    """files_audioset.csv from the outputs on disk, so it never names a missing or broken file."""
    from m2das.data.audio import duration_from_frames

    data_dir = Path(data_dir)
    lms_dir = data_dir / LMS_DIR
    names = []  # (path, path relative to DATA_DIR)
    for root, dirs, files in os.walk(lms_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        prefix = Path(os.path.relpath(root, data_dir)).as_posix()
        names += [(os.path.join(root, n), f"{prefix}/{n}") for n in files
                  if n.endswith(".npy") and not n.startswith(".")]
    good, bad, seconds = [], [], 0.0
    with progress_bar(len(names), "list", progress) as bar:
        for path, rel in names:
            try:
                seconds += duration_from_frames(check_lms_file(path))
                good.append(rel)
            except (OSError, ValueError, EOFError) as e:
                bad.append((path, " ".join(str(e).split())))
            bar.update(1)
    good.sort()
    out = data_dir / FILE_LIST
    write_csv(out, ["file_name"], ([n] for n in good))
    for path, reason in bad[:5]:
        log(f"  unusable output {path}: {reason}; delete it and rerun to convert it again")
    return {"listed": len(good), "invalid_outputs": len(bad), "hours_listed": seconds / 3600.0,
            "file_list": str(out)}


def read_file_list(data_dir) -> list[str]:
    path = Path(data_dir) / FILE_LIST
    if not path.is_file():
        raise PrepareError(f"{path} not found; run the list step first (--steps list)", 2)
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0].strip() != "file_name":
            raise PrepareError(f"{path}: first line must be 'file_name'; rerun --steps list", 2)
        return [row[0] for row in reader if row and row[0]]


def run_labels(data_dir, metadata_dir=None, url_base=None, hold_out_eval: bool = False) -> dict:
    """files_as_weighted.csv; metadata from `metadata_dir`, else downloaded once into DATA/metadata."""
    from m2das.data import heldout, labels

    data_dir = Path(data_dir)
    try:
        if metadata_dir is None:
            metadata_dir = labels.fetch_metadata(data_dir / METADATA_DIR, url_base, warn=log)
        else:
            metadata_dir = labels.check_metadata_dir(metadata_dir)
        label_map = labels.load_label_map(metadata_dir, warn=log)
        class_mids = labels.read_class_mids(Path(metadata_dir) / labels.CLASS_FILE)
    except labels.MetadataError as e:
        raise PrepareError(str(e), 2) from None
    names = read_file_list(data_dir)
    out = data_dir / WEIGHTED_LIST
    result = labels.write_weighted_list(out, names, label_map, class_mids)
    result.update({"weighted_list": str(out), "metadata_dir": str(metadata_dir),
                   "label_map_size": len(label_map), "classes": len(class_mids)})
    # files_as_eval.csv for the training monitor; --hold-out-eval also drops those clips from training.
    result.update(heldout.write_eval_list(data_dir, metadata_dir, WEIGHTED_LIST, hold_out_eval))
    if result["unknown_mids"]:
        log(f"warning: {len(result['unknown_mids'])} label MIDs are not in "
            f"{labels.CLASS_FILE}, e.g. {result['unknown_mids'][:3]}")
    return result


def run_stats(data_dir, num_files: int | None = None, seed: int | None = None,
              progress: bool = True) -> dict:
    """norm_stats.json with the shared rule of m2das.data.stats (fixed seed, so reruns agree)."""
    from m2das.data import stats

    data_dir = Path(data_dir)
    names = read_file_list(data_dir)
    if not names:
        raise PrepareError(f"{data_dir / FILE_LIST} is empty: nothing to compute statistics from", 1)
    num_files = stats.DEFAULT_STATS_FILES if num_files is None else num_files
    seed = stats.DEFAULT_STATS_SEED if seed is None else seed
    with progress_bar(num_files, "stats", progress, unit="crop") as bar:  # crops drawn with replacement
        try:
            result = stats.compute_norm_stats([os.path.join(data_dir, n) for n in names],
                                              num_files=num_files, seed=seed,
                                              progress=lambda n, total: bar.update(1))
        except stats.NonFiniteLMS as e:
            raise PrepareError(str(e), 2) from None
    out = data_dir / NORM_STATS
    stats.write_norm_stats(out, result)
    return {"norm_stats": str(out), "mean": result["mean"], "std": result["std"]}


# ---------------------------------------------------------------- the whole run


@contextlib.contextmanager
def _lock(data_dir):
    """One prepare per data folder: two would delete each other's temporary files."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        f = open(data_dir / PREPARE_LOCK, "a+")
    except OSError as e:
        raise PrepareError(f"cannot write to the data folder {data_dir} ({e.strerror or e}); "
                           f"pass a writable DATA_DIR (in docker: add --user \"$(id -u):$(id -g)\" so the "
                           f"container writes as you, and mount the folder with -v)", 2) from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise PrepareError(f"another `m2das prepare` is running on {data_dir}; wait for it "
                               f"or stop it", 1) from None
        _remove_stale_temps(data_dir)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temps(data_dir: Path) -> None:
    """Temporaries of lists, stats and downloads that a killed run left (LMS ones: existing_outputs)."""
    for folder in (data_dir, data_dir / METADATA_DIR):
        if folder.is_dir():
            for path in folder.glob(".*.tmp"):
                if _TMP_ANY.match(path.name):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()


def parse_steps(steps) -> list[str]:
    if isinstance(steps, str):
        steps = [s.strip() for s in steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise PrepareError(f"--steps {','.join(steps)}: choose from {','.join(STEPS)}", 2)
    return [s for s in STEPS if s in steps]


def check_inputs(steps, audio_dir, data_dir: Path, metadata_dir, device: str, stats_files, url_base=None) -> None:
    """Every input the chosen steps read, checked before the first step runs: a wrong --metadata
    must not wait for an hour of LMS conversion to be found."""
    from m2das.data import labels

    if "lms" in steps:
        _check_audio_dir(Path(audio_dir))
        resolve_device(device)
    if ("labels" in steps or "stats" in steps) and "list" not in steps:
        read_file_list(data_dir)
    try:
        if "labels" in steps and metadata_dir is not None:
            labels.check_metadata_dir(metadata_dir)
        elif "labels" in steps:
            labels.check_url(url_base)
    except labels.MetadataError as e:
        raise PrepareError(str(e), 2) from None
    if "stats" in steps and stats_files is not None and stats_files < 1:
        raise PrepareError(f"--stats-files {stats_files}: expected at least 1 (default 5000)", 2)


def run_prepare(audio_dir, data_dir, metadata_dir=None,
                device: str = "auto", workers: int | None = None, steps=STEPS,
                url_base: str | None = None, stats_files: int | None = None,
                batch_size: int = 32, progress: bool = True, reconvert: bool = False,
                hold_out_eval: bool = False) -> dict:
    """Run the chosen steps; return the summary. Raises PrepareError (with .code) when fatal."""
    steps = parse_steps(steps)
    data_dir = Path(data_dir)
    check_inputs(steps, audio_dir, data_dir, metadata_dir, device, stats_files, url_base)
    started = time.monotonic()
    summary: dict = {"steps": steps, "data_dir": str(data_dir)}
    with _lock(data_dir):
        if "lms" in steps:
            summary.update(run_lms(audio_dir, data_dir, device, workers, batch_size, progress,
                                   reconvert=reconvert))
        if "list" in steps:
            summary.update(write_file_list(data_dir, progress))
        nothing_listed = summary.get("listed") == 0  # labels and stats would have no input
        labels_error = None
        if "labels" in steps and not nothing_listed:
            try:
                summary.update(run_labels(data_dir, metadata_dir, url_base, hold_out_eval))
            except PrepareError as e:  # missing metadata: still finish the stats, then report
                labels_error = e
        if "stats" in steps and not nothing_listed:
            summary.update(run_stats(data_dir, stats_files, progress=progress))
        if labels_error is not None:
            raise labels_error
    summary["seconds"] = time.monotonic() - started
    summary["ok"], summary["reason"] = _usable(summary)
    return summary


def _usable(s: dict) -> tuple[bool, str]:
    if "listed" in s and s["listed"] == 0:
        return False, (f"no usable LMS file in {s['data_dir']}/{LMS_DIR} (see "
                       f"{FAILURES} for files that failed)")
    if "labelled" in s and s["labelled"] == 0:
        return False, ("no file has a label in the AudioSet lists (the LMS files and "
                       f"{FILE_LIST} are fine for plain M2D); check the file names: the YouTube "
                       "ID must be their first 11 characters, or follow a leading 'Y'")
    if "converted" in s and "listed" not in s and s["converted"] + s["skipped_existing"] == 0:
        return False, "no audio file was converted"
    return True, ""


def format_summary(s: dict) -> str:
    lines = ["", "m2das prepare summary"]
    if "converted" in s:
        lines.append(f"  converted          {s['converted']} ({s['hours_converted']:.2f} h of audio, "
                     f"{s['silent']} silent) on {s['device']}")
        lines.append(f"  skipped (existing) {s['skipped_existing']}")
        if s["reconverted"] or s["other_recipe_outputs"]:
            lines.append(f"  reconverted        {s['reconverted']} (new LMS recipe), "
                         f"{s['other_recipe_outputs']} of another recipe left")
        lines.append(f"  failed             {s['failed']}  -> {s['failures_file']}")
        lines.append(f"  LMS folder         {Path(s['data_dir']) / LMS_DIR} ({s['recipe']}, "
                     f"recorded in {RECIPE_FILE})")
        if s["ignored_non_audio"]:
            lines.append(f"  ignored non-audio  {s['ignored_non_audio']} (by extension)")
    if "listed" in s:
        lines.append(f"  listed             {s['listed']} ({s['hours_listed']:.2f} h) -> "
                     f"{s['file_list']}")
        if s["invalid_outputs"]:
            lines.append(f"  unusable outputs   {s['invalid_outputs']} (not in the list)")
    if "labelled" in s:
        lines.append(f"  labelled           {s['labelled']} -> {s['weighted_list']}")
        lines.append(f"  without labels     {s['without_labels']} (YTID in no list; left out)"
                     + (f", e.g. {', '.join(s['without_labels_examples'][:3])}"
                        if s["without_labels"] else ""))
        lines.append(f"  classes with no file {s['classes_without_files']} of {s['classes']}")
    if "norm_stats" in s:
        lines.append(f"  norm stats         mean {s['mean']:.4f} std {s['std']:.4f} -> "
                     f"{s['norm_stats']}")
    lines.append(f"  time               {s['seconds']:.1f} s")
    return "\n".join(lines)


def build_parser() -> Parser:
    p = Parser(
        prog="m2das prepare",
        description=f"Audio folder -> LMS .npy files, {FILE_LIST}, {WEIGHTED_LIST}, {NORM_STATS}. Rerun to "
                    f"finish an interrupted run; done files are kept. Flags take hyphens or underscores.")
    p.add_argument("audio_dir", metavar="AUDIO_DIR",
                   help=f"folder of AudioSet clips, any depth (in the container: {DEFAULT_AUDIO_DIR})")
    p.add_argument("data_dir", metavar="DATA_DIR",
                   help=f"output data folder (in the container: {DEFAULT_DATA_DIR})")
    p.add_flag("--metadata", metavar="DIR", default=None,
               help="folder with eval_segments.csv, balanced_train_segments.csv, "
                    "[unbalanced_train_segments.csv], class_labels_indices.csv; "
                    f"default: DATA_DIR/{METADATA_DIR}, downloading what is missing")
    p.add_flag("--metadata-url", metavar="URL", default=None,
               help="where to download the lists from: a URL or a mirror folder (env "
                    "M2DAS_AUDIOSET_URL; default Google's AudioSet release)")
    p.add_flag("--device", type=machine.device_flag, default="auto", help=f"{machine.DEVICE_HELP} (default auto)")
    p.add_flag("--workers", type=int, default=None, help="worker processes (default: all CPU cores)")
    p.add_flag("--steps", default=",".join(STEPS),
               help=f"comma-separated subset of {','.join(STEPS)} (default all)")
    p.add_flag("--stats-files", type=int, default=None,
               help="random crops for the normalisation statistics (default 5000)")
    p.add_flag("--batch-size", type=int, default=32, help="clips per GPU batch (default 32)")
    p.add_flag("--reconvert", action="store_true",
               help=f"DATA_DIR was made with another LMS recipe (see {RECIPE_FILE}): convert "
                    f"its affected files again (without it, such a folder is refused)")
    p.add_flag("--no-progress", action="store_true", help="no progress bars")
    p.add_flag("--hold-out-eval", action="store_true",
               help=f"keep clips of eval_segments.csv out of {WEIGHTED_LIST} (they are always "
                    f"listed in {EVAL_LIST}, the training monitor's default list)")
    return p


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no folders are assumed outside the container (its entry point passes them)
        parser.print_help(sys.stderr)
        log("\nm2das prepare: pass AUDIO_DIR and DATA_DIR")
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad flag (one line already printed), or --help
        return int(e.code or 0)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        summary = run_prepare(args.audio_dir, args.data_dir, args.metadata, args.device,
                              args.workers, args.steps, args.metadata_url, args.stats_files,
                              args.batch_size, not args.no_progress, args.reconvert,
                              hold_out_eval=args.hold_out_eval)
    except PrepareError as e:
        log(f"m2das prepare: {e}")
        return e.code
    except KeyboardInterrupt:
        log("m2das prepare: interrupted; finished files are kept, rerun the same command to "
            "go on")
        return 130
    except OSError as e:  # disk full, read-only mount: every later file would fail the same way
        where = f" {e.filename}" if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            log(f"m2das prepare: no space left on the device of {args.data_dir} (writing{where}); free space "
                f"(or raise the quota) and rerun the same command (finished files are kept)")
        else:
            log(f"m2das prepare: cannot write{where}: {e.strerror or e}; fix it and rerun the same "
                f"command (finished files are kept)")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_summary(summary))
    if not summary["ok"]:
        log(f"m2das prepare: {summary['reason']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
