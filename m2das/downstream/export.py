"""`m2das export RUN|CHECKPOINT`: encoder weights the published runtime and EVAR load as they are.

Keeps `patch_embed.*`, `cls_token`, `pos_embed`, `blocks.*`, `norm.*`,
`norm_stats` and the AudioSet head `offline_predictor.*` (about 350 MB for
ViT-B instead of 1.7 GB) in a folder named
`{model}-{F}x{T}p{pf}x{pt}p16k-{YYMMDD}-{config}_enconly`, the name those tools
parse the sizes from. A run folder named otherwise (--output_dir runs/mine) gives
its own name as the tag, so exports of two runs never share a folder; an export
that would replace a different one is refused. The head is kept because the runtime's loader sizes an
`m2d_as_vit*` model from `offline_predictor.weight` (a file without it fails
there with KeyError) and because it makes the file an AudioSet tagger; its class
list goes to classes.json beside it. The file holds tensors only, so a plain
`torch.load` (weights_only) reads it.
"""

import argparse
import contextlib
import datetime
import re
import sys
from pathlib import Path

from m2das import remote
from m2das.cliargs import Parser
from m2das.fileio import is_url
from m2das.runfolder import EXIT_BAD_INPUT, EXIT_RESUMABLE
from m2das.downstream.weights import HEAD_PREFIX, WeightsError, read_weights
from m2das.runfolder import folder_name, parse_folder_name

CLASSES_FILE = "classes.json"


def export_name(w) -> str:
    """The run folder's date and config tag when its name has them, else the folder's own name as the tag
    (with the checkpoint's date), so two runs exported side by side land in two folders."""
    name = w.path.parent.name
    run = parse_folder_name(name)
    parts = name.split("-", 3) if run else []
    if len(parts) == 4:
        date, tag = parts[2], parts[3]
    else:
        date = f"{datetime.date.fromtimestamp(w.path.stat().st_mtime):%y%m%d}"
        rest = parts[2] if len(parts) == 3 else name if not run else ""
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", rest).strip("_.-") or "export"
    model = w.model or (run or {}).get("model") or "m2d_as_vit_base"
    return folder_name(model, w.input_size, w.patch_size, date, f"{tag}_enconly")


def same_tensors(path: Path, state: dict) -> bool:
    """Does the file at `path` already hold exactly these tensors (a repeated export)?"""
    import torch

    from m2das.ckptfile import safe_load

    try:
        old = safe_load(path, require_model=False)  # runs no code, refuses a compressed record
    except Exception:  # unreadable or not ours: different
        return False
    return isinstance(old, dict) and old.keys() == state.keys() and all(
        isinstance(old[k], torch.Tensor) and old[k].dtype == v.dtype and torch.equal(old[k], v)
        for k, v in state.items())


def export(source, out_dir=None, epoch: int | None = None, with_head: bool = False) -> Path:
    """Write the encoder file (with the head when the weights have one); returns its path.

    `with_head=True` only insists that there is a head. Raises WeightsError for unusable input.
    """
    import torch

    from m2das.fileio import atomic_write, write_json

    w = read_weights(source, epoch)
    has_head = HEAD_PREFIX + "weight" in w.state
    if with_head and not has_head:
        raise WeightsError(f"{w.path}: has no AudioSet head ({HEAD_PREFIX}weight); export without --with-head")
    state = {k: v.detach().clone().contiguous() for k, v in w.encoder_state(with_head=True).items()}
    folder = Path(out_dir) if out_dir is not None else w.path.parent.parent
    folder = folder / export_name(w)
    name = f"weights_ep{w.epoch}.pth" if w.epoch is not None else f"{w.path.stem}.pth"
    dest = folder / name
    if dest.exists() and not same_tensors(dest, state):
        raise WeightsError(f"{dest}: already holds a different export (another run or checkpoint); "
                           f"pass --out ANOTHER_FOLDER, or delete it to replace it")
    if not dest.exists():  # the same weights again: nothing to write
        with atomic_write(dest) as f:
            torch.save(state, f)
    if has_head and w.classes:
        write_json(folder / CLASSES_FILE, list(w.classes))
    return dest


def main(argv=None) -> int:
    p = Parser(prog="m2das export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN|CHECKPOINT", help="a run folder (also s3://... and other fsspec URLs) "
                   "or a checkpoint file")
    p.add_argument("--epoch", type=int, default=None, help="checkpoint-EPOCH.pth of the run (default: the last)")
    p.add_argument("--out", default=None, help="parent of the export folder (default: the run folder's parent; "
                   "the current folder for a URL)")
    p.add_argument("--with-head", "--with_head", action="store_true", dest="with_head",
                   help=f"fail unless the weights have the AudioSet head; the head (and {CLASSES_FILE}) is in "
                        f"every export of weights that have one, since the runtime's loader reads it")
    args = p.parse_args(argv)
    try:
        with contextlib.ExitStack() as copy:  # a run folder in object storage: a local copy, removed after
            source, out = args.source, args.out
            if is_url(source):
                source = copy.enter_context(remote.reading_copy(source, epoch=args.epoch)).staging
                out = out or "."
            dest = export(source, out, None if is_url(args.source) else args.epoch, args.with_head)
    except remote.StoreUnavailable as e:
        print(f"m2das export: {e}; try again later (exit {EXIT_RESUMABLE})", file=sys.stderr)
        return EXIT_RESUMABLE
    except (WeightsError, OSError, remote.RemoteError) as e:
        print(f"m2das export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    size = dest.stat().st_size
    print(f"wrote {dest} ({size / 1e6:.1f} MB); load it with m2das.load_encoder({str(dest)!r}) or the M2D runtime")
    return 0
