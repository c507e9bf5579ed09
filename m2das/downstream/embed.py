"""`m2das embed AUDIO_DIR OUT.npz --weights W`: clip embeddings of every audio or LMS file in a folder.

An audio file is encoded the way the published runtime encodes it: its LMS as
it is (a 1-s clip is 101 LMS frames, 7 time frames), never padded with silence
to the 6.1 s of pre-training's crops. Files are read a window ahead on threads
and encoded in batches of clips with the same number of frames (clips are
sorted by length first, so most batches are full), on the GPU when there is one.
"""

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from m2das.cliargs import Parser
from m2das.runfolder import EXIT_BAD_INPUT

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au", ".opus"}
LMS_SUFFIX = ".npy"


class InputError(ValueError):
    """An input file that cannot be embedded; the message names it and the fix."""


class NonFiniteInput(InputError):
    """An input holding NaN or inf: its embedding would be NaN, so the run stops instead of skipping it."""


def refuse_non_finite(path, lms: np.ndarray) -> np.ndarray:
    if not np.isfinite(lms).all():
        raise NonFiniteInput(f"{path}: {int((~np.isfinite(lms)).sum())} NaN/inf value(s) in its LMS; recreate it "
                             f"with `m2das prepare` (or remove it from the folder)")
    return lms


def find_inputs(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES | {LMS_SUFFIX})
    if not found:
        raise InputError(f"{folder}: no audio ({', '.join(sorted(AUDIO_SUFFIXES))}) or .npy LMS files in it")
    return found


def read_lms(path) -> np.ndarray:
    """An LMS .npy as `m2das prepare` writes it, or an audio file made into one the way the runtime
    makes it (no 6.1-s minimum padding)."""
    from m2das.data import audio

    path = Path(path)
    if path.suffix.lower() == LMS_SUFFIX:
        try:
            lms = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"{path}: unreadable .npy ({e}); recreate it with `m2das prepare`") from None
        if lms.ndim == 2:
            lms = lms[None]
        if lms.ndim != 3 or lms.shape[:2] != (1, audio.N_MELS):
            raise InputError(f"{path}: expected an LMS of shape [1, {audio.N_MELS}, T], got {list(lms.shape)}; "
                             f"make it with `m2das prepare`")
        return refuse_non_finite(path, lms.astype(np.float32, copy=False))
    try:
        return refuse_non_finite(path, audio.lms_from_file(path, pad=False)[0])
    except audio.AudioError as e:
        raise InputError(f"{path}: {e}") from None


def samples_16k(path) -> int:
    """Length of an audio file once at 16 kHz, from its header alone."""
    import soundfile as sf

    from m2das.data.audio import resampled_length

    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile reports corrupt and unknown formats alike
        raise InputError(f"{path}: unreadable by soundfile ({' '.join(str(e).split())}); re-download or convert "
                         f"it to wav/flac") from None
    return resampled_length(info.frames, info.samplerate)


def read_clip(path, clip_samples: int, start: int = 0) -> np.ndarray:
    """An audio file at a task's clip length, as the authors' evaluation tool loads it: mono at 16 kHz,
    `clip_samples` cut from `start`, or zero-padded at the end; then its LMS without further padding."""
    from m2das.data import audio

    try:
        wave, sr = audio.load_audio(path)
        x = audio.resample_16k(audio.mono(wave), sr)
        x = x[start:start + clip_samples]
        if x.size < clip_samples:
            x = np.concatenate([x, np.zeros(clip_samples - x.size, dtype=np.float32)])
        return refuse_non_finite(path, audio.lms_batch_16k([x], pad=False)[0])
    except audio.AudioError as e:
        raise InputError(f"{path}: {e}") from None


def length_hint(path: Path) -> float:
    """Seconds or frames, only to put clips of equal length next to each other."""
    try:
        if path.suffix.lower() == LMS_SUFFIX:
            return float(np.load(path, mmap_mode="r").shape[-1])
        import soundfile as sf

        info = sf.info(str(path))
        return 100.0 * info.frames / info.samplerate
    except Exception:  # an unreadable file is reported when it is read
        return 0.0


def embed_files(encoder, items, batch_size: int = 32, workers: int = 4, progress: bool = True,
                desc: str = "embedding", load=read_lms, hint=None, failures: dict | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Clip embeddings [N, D] (float32) and time-frame counts [N] of `items`, in their order.

    `load(item)` gives an LMS [1, 80, T] (default: `read_lms` of a path); `hint(item)` a length to
    sort by, so that clips of one length share a batch. With `failures` (a dict), an item whose load
    raises InputError is recorded there (index -> message) and left as a zero row instead of
    stopping the whole run at its first unreadable file.
    """
    import torch
    from tqdm import tqdm

    items = list(items)
    hint = hint or (lambda item: length_hint(Path(item)))
    order = sorted(range(len(items)), key=lambda i: hint(items[i]))
    out = np.zeros((len(items), encoder.feature_dim), dtype=np.float32)
    counts = np.zeros(len(items), dtype=np.int64)
    pending: list = []

    def flush():
        if pending:
            batch = torch.from_numpy(np.stack([lms for _, lms in pending]))
            with torch.no_grad():
                frames, clip = encoder(batch)
            ids = [i for i, _ in pending]
            out[ids] = clip.float().cpu().numpy()
            counts[ids] = frames.shape[1]
            bar.update(len(pending))
            pending.clear()

    def load_or_record(j):
        try:
            return load(items[j])
        except InputError as e:
            if failures is None or isinstance(e, NonFiniteInput):
                raise
            failures[j] = str(e)
            return None

    window = max(batch_size * 4, 16)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(items), desc=desc, unit="clip", disable=not progress, file=sys.stderr,
                 mininterval=1.0, dynamic_ncols=True) as bar:
        for start in range(0, len(order), window):
            ids = order[start:start + window]
            for i, lms in zip(ids, pool.map(load_or_record, ids)):
                if lms is None:
                    bar.update(1)
                    continue
                if pending and (pending[0][1].shape != lms.shape or len(pending) == batch_size):
                    flush()
                pending.append((i, lms))
        flush()
    return out, counts


def pick_device(name: str) -> str:
    """m2das.machine's device choice; a malformed or absent device is an InputError (one line, exit 2)."""
    from m2das.machine import DeviceError, resolve_device

    try:
        return str(resolve_device(name))
    except DeviceError as e:
        raise InputError(str(e)) from None


def failures_path(out) -> Path:
    """Where the unreadable files of OUT.npz are listed: OUT_failures.csv beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}_failures.csv")


def main(argv=None) -> int:
    p = Parser(prog="m2das embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Files that cannot be read are skipped and listed (file,error) in "
                                       "OUT_failures.csv; exit 0 with a warning when some failed, 2 when all did. A file "
                                       "holding NaN/inf stops the run (exit 2): its embedding would be NaN.")
    p.add_argument("audio_dir", metavar="AUDIO_DIR", help="folder of audio files or LMS .npy files (searched recursively)")
    p.add_argument("out", metavar="OUT.npz", help="writes files (relative names), embeddings [N, D] and frames "
                   "[N] (time frames averaged into each embedding)")
    p.add_argument("--weights", required=True, help="an exported encoder, a checkpoint or a run folder")
    p.add_argument("--batch_size", "--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | gpu (= cuda)")
    p.add_argument("--no_progress", "--no-progress", action="store_true")
    args = p.parse_args(argv)

    from m2das.data.labels import write_csv
    from m2das.downstream.encoder import load_encoder
    from m2das.downstream.weights import WeightsError
    from m2das.fileio import atomic_write

    failures: dict = {}
    try:
        files = find_inputs(args.audio_dir)
        encoder = load_encoder(args.weights, pick_device(args.device))
        emb, frames = embed_files(encoder, files, args.batch_size, progress=not args.no_progress, failures=failures)
    except (InputError, WeightsError) as e:
        print(f"m2das embed: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    names = [str(f.relative_to(args.audio_dir)) for f in files]
    listed = failures_path(args.out)
    if failures:
        rows = [(names[i], msg.removeprefix(f"{files[i]}: ")) for i, msg in sorted(failures.items())]
        write_csv(listed, ["file", "error"], rows)
    elif listed.exists():
        listed.unlink()  # an earlier run's list no longer applies
    if len(failures) == len(files):
        print(f"m2das embed: error: none of the {len(files)} files could be read ({rows[0][0]}: {rows[0][1]}); "
              f"all are listed in {listed}", file=sys.stderr)
        return EXIT_BAD_INPUT
    keep = [i for i in range(len(files)) if i not in failures]
    with atomic_write(args.out) as f:
        np.savez(f, files=np.array([names[i] for i in keep]), embeddings=emb[keep], frames=frames[keep])
    print(f"wrote {args.out}: {len(keep)} clips x {emb.shape[1]} features")
    if failures:
        print(f"m2das embed: warning: {len(failures)} of {len(files)} files could not be read and were skipped "
              f"(e.g. {rows[0][0]}: {rows[0][1]}); listed in {listed}", file=sys.stderr)
    return 0
