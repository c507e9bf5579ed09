"""`m2das embed AUDIO_DIR OUT.npz --weights W`: clip embeddings of every audio or LMS file in a folder.

Files are read a window ahead on threads and encoded in batches of clips with
the same number of frames (clips are sorted by length first, so most batches
are full), on the GPU when there is one.
"""

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from m2das.runfolder import EXIT_BAD_INPUT

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au", ".opus"}
LMS_SUFFIX = ".npy"


class InputError(ValueError):
    """An input file that cannot be embedded; the message names it and the fix."""


def find_inputs(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES | {LMS_SUFFIX})
    if not found:
        raise InputError(f"{folder}: no audio ({', '.join(sorted(AUDIO_SUFFIXES))}) or .npy LMS files in it")
    return found


def read_lms(path) -> np.ndarray:
    """An LMS .npy as `m2das prepare` writes it, or an audio file made into one the same way."""
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
        return lms.astype(np.float32, copy=False)
    try:
        return audio.lms_from_file(path)[0]
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


def embed_files(encoder, paths, batch_size: int = 32, workers: int = 4, progress: bool = True,
                desc: str = "embedding") -> np.ndarray:
    """Clip embeddings [N, D] (float32) of `paths`, in their order."""
    import torch
    from tqdm import tqdm

    paths = [Path(p) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: length_hint(paths[i]))
    out = np.zeros((len(paths), encoder.feature_dim), dtype=np.float32)
    pending: list = []

    def flush():
        if pending:
            batch = torch.from_numpy(np.stack([lms for _, lms in pending]))
            with torch.no_grad():
                clip = encoder(batch).clip
            out[[i for i, _ in pending]] = clip.float().cpu().numpy()
            bar.update(len(pending))
            pending.clear()

    window = max(batch_size * 4, 16)
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(paths), desc=desc, unit="clip", disable=not progress, file=sys.stderr,
                 mininterval=1.0, dynamic_ncols=True) as bar:
        for start in range(0, len(order), window):
            ids = order[start:start + window]
            for i, lms in zip(ids, pool.map(lambda j: read_lms(paths[j]), ids)):
                if pending and (pending[0][1].shape != lms.shape or len(pending) == batch_size):
                    flush()
                pending.append((i, lms))
        flush()
    return out


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="m2das embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("audio_dir", metavar="AUDIO_DIR", help="folder of audio files or LMS .npy files (searched recursively)")
    p.add_argument("out", metavar="OUT.npz", help="writes files (relative names) and embeddings [N, D]")
    p.add_argument("--weights", required=True, help="an exported encoder, a checkpoint or a run folder")
    p.add_argument("--batch_size", "--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no_progress", "--no-progress", action="store_true")
    args = p.parse_args(argv)

    from m2das.downstream.encoder import load_encoder
    from m2das.fileio import atomic_write
    from m2das.downstream.weights import WeightsError

    try:
        files = find_inputs(args.audio_dir)
        encoder = load_encoder(args.weights, pick_device(args.device))
        emb = embed_files(encoder, files, args.batch_size, progress=not args.no_progress)
    except (InputError, WeightsError) as e:
        print(f"m2das embed: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    names = np.array([str(f.relative_to(args.audio_dir)) for f in files])
    with atomic_write(args.out) as f:
        np.savez(f, files=names, embeddings=emb)
    print(f"wrote {args.out}: {emb.shape[0]} clips x {emb.shape[1]} features")
    return 0
