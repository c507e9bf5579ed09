"""Clip embeddings for the evaluation protocols, computed once per weights and clip set and cached.

The cache is keyed by the weight file, the clips (file, crop start, clip length)
and whether the encoder is the random baseline, never by the classifier's seed
or settings: three seeds and every rerun cost one pass over the audio.
"""

import hashlib
import os
from pathlib import Path

import numpy as np

from m2das.downstream.protocol import SEEDS

RANDOM_INIT_SEED = SEEDS[0]  # the random baseline's weights: one draw, so its embeddings cache too


class ListError(ValueError):
    """The evaluation list cannot be used; the message names the file and the fix."""


def targets_of(labels, classes, multi_label: bool) -> np.ndarray:
    index = {c: i for i, c in enumerate(classes)}
    if not multi_label:
        return np.array([index[row[0]] for row in labels], dtype=np.int64)
    out = np.zeros((len(labels), len(classes)), dtype=np.float32)
    for r, row in enumerate(labels):
        out[r, [index[c] for c in row]] = 1.0
    return out


# -- the embedding cache: keyed by the weights, the clips (file, crop start, clip length) and nothing else --

def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "m2das" / "embeddings"


def item_name(item) -> str:
    """A clip: a path (the whole file) or (path, start sample, clip samples)."""
    if isinstance(item, tuple):
        path, start, samples = item
        return f"{Path(path).resolve()}|{start}|{samples}"
    return f"{Path(item).resolve()}|whole"


def cache_key(weights: Path, items, random_init: bool) -> str:
    """Changes when the weight file or the clip set changes; not with the classifier's seed or settings."""
    st = weights.stat()
    h = hashlib.sha1(f"{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}|{random_init}".encode())
    for name in sorted(item_name(i) for i in items):
        h.update(name.encode() + b"\0")
    return h.hexdigest()[:16]


def random_encoder_like(encoder, model_name: str, seed: int = RANDOM_INIT_SEED):
    """An encoder of the same size and norm stats, with M2D-AS's initialisation and fresh random weights."""
    import torch

    from m2das.downstream.encoder import load_sized
    from m2das.downstream.weights import is_encoder_key
    from m2das.model import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = create_model(model_name, input_size=encoder.input_size, patch_size=encoder.patch_size, num_classes=1)
    state = {k: v for k, v in fresh.state_dict().items() if is_encoder_key(k) and k != "norm_stats"}
    load_sized(encoder, state, f"--random_init ({model_name})", strict=False)
    return encoder


def cached_embeddings(weights_file: Path, items, *, cache_dir=None, device="cpu", random_init=False,
                      embed_batch=32, progress=True, desc="embedding"):
    """-> (embeddings [N, D], time frames [N], whether they came from the cache). One pass per clip set."""
    from m2das.downstream.embed import embed_files, length_hint, read_clip, read_lms
    from m2das.downstream.encoder import load_encoder
    from m2das.downstream.weights import read_weights
    from m2das.fileio import atomic_write

    items = list(items)
    names = [item_name(i) for i in items]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_file = cache / f"{cache_key(weights_file, items, random_init)}.npz"
    if cache_file.exists():
        with np.load(cache_file, allow_pickle=False) as z:
            row = {n: i for i, n in enumerate(z["files"])}
            if all(n in row for n in names):
                take = [row[n] for n in names]
                return z["embeddings"][take], z["frames"][take], True
    encoder = load_encoder(weights_file, device)
    if random_init:
        encoder = random_encoder_like(encoder, read_weights(weights_file).model)

    def load(item):
        return read_clip(item[0], item[2], item[1]) if isinstance(item, tuple) else read_lms(item)

    def hint(item):
        return float(item[2]) if isinstance(item, tuple) else length_hint(Path(item))

    emb, frames = embed_files(encoder, items, embed_batch, progress=progress, desc=desc, load=load, hint=hint)
    with atomic_write(cache_file) as f:
        np.savez(f, files=np.array(names), embeddings=emb, frames=frames)
    return emb, frames, False
