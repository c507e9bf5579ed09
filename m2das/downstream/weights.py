"""Reading weight files of any kind (m2das checkpoints, published M2D files, encoder-only exports).

The published runtime and EVAR read the model name, input size and patch size
from the weight file's parent folder (the naming convention of
m2das.runfolder.folder_name) and keep only the encoder's keys.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from m2das import runfolder
from m2das.runfolder import ENCODER_KEYS, ENCODER_PREFIXES, HEAD_PREFIX, parse_folder_name  # noqa: F401

FINETUNED_PREFIX = "encoder."  # `m2das finetune`'s network: the encoder under this name, its task head beside it
DEFAULT_NORM_STATS = (-7.1, 4.2)  # what the runtime assumes for a file without norm_stats


class WeightsError(ValueError):
    """A path that cannot give encoder weights; the message names it and the fix."""


def is_encoder_key(name: str) -> bool:
    return name in ENCODER_KEYS or name.startswith(ENCODER_PREFIXES)


@dataclass
class WeightFile:
    path: Path
    state: dict                      # tensors by name ("module." prefixes removed)
    model: str | None
    input_size: list
    patch_size: list
    epoch: int | None = None
    classes: list = field(default_factory=list)

    def encoder_state(self, with_head: bool = False) -> dict:
        keep = {k: v for k, v in self.state.items() if is_encoder_key(k) or (with_head and k.startswith(HEAD_PREFIX))}
        if "norm_stats" not in keep:
            import torch

            keep["norm_stats"] = torch.tensor(DEFAULT_NORM_STATS)
        return keep


def resolve_checkpoint(path, epoch: int | None = None) -> Path:
    """A run folder -> its checkpoint-{epoch}.pth (default: the highest epoch, else last.pth); a file -> itself."""
    path = Path(path)
    if path.is_file():
        if epoch is not None:
            raise WeightsError(f"{path}: --epoch picks a checkpoint inside a run folder; pass the folder instead")
        return path
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or run folder")
    if epoch is not None:
        chosen = path / runfolder.epoch_checkpoint_name(epoch)
        if not chosen.exists():
            have = sorted(epochs_in(path))
            raise WeightsError(f"{chosen}: no checkpoint for epoch {epoch} (epochs here: {have or 'none'})")
        return chosen
    have = epochs_in(path)
    if have:
        return path / runfolder.epoch_checkpoint_name(max(have))
    if (path / runfolder.LAST).exists():
        return path / runfolder.LAST
    weights = sorted(path.glob("*.pth"))
    if len(weights) == 1:
        return weights[0]
    raise WeightsError(f"{path}: no checkpoint-N.pth or {runfolder.LAST} in this folder; pass a weight file")


def epochs_in(run_dir: Path) -> list:
    return runfolder.saved_epochs(run_dir.iterdir())


def _load(path: Path):
    """The checkpointer's reader: integrity-checked, runs no code (published files may hold an argparse.Namespace)."""
    from m2das.ckptfile import CheckpointError, load_weight_file

    if not path.exists():
        raise WeightsError(f"{path}: no such file")
    try:
        return load_weight_file(path)
    except CheckpointError as e:
        raise WeightsError(str(e)) from None


def read_weights(path, epoch: int | None = None) -> WeightFile:
    """Any M2D / M2D-AS weight file, or a run folder, -> tensors plus the sizes it was trained at.

    Sizes come from the checkpoint's args when it has them, else from the folder name.
    """
    import torch

    path = resolve_checkpoint(path, epoch)
    raw = _load(path)
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: holds a {type(raw).__name__}, not a state dict")
    state = raw.get("model", raw)
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: its 'model' entry is a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    finetuned = any(k.startswith(FINETUNED_PREFIX + "blocks.") for k in state)
    if finetuned:  # the encoder's own names back; the task head is not the AudioSet head the runtime reads
        state = {k[len(FINETUNED_PREFIX):]: v for k, v in state.items() if k.startswith(FINETUNED_PREFIX)}
    if "pos_embed" not in state or not any(k.startswith("blocks.") for k in state):
        raise WeightsError(f"{path}: no ViT encoder weights (pos_embed, blocks.*) in it")
    args = raw.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else (args if isinstance(args, dict) else {})
    named = parse_folder_name(path.parent.name) or parse_folder_name(path.stem) or {}
    model = args.get("model") or named.get("model")
    input_size = _pair(args.get("input_size")) or named.get("input_size")
    patch_size = _pair(args.get("patch_size")) or named.get("patch_size")
    if input_size is None or patch_size is None:
        raise WeightsError(f"{path}: cannot tell its input and patch size: the checkpoint has no args and the "
                           f"folder name {path.parent.name!r} is not {{model}}-{{F}}x{{T}}p{{pf}}x{{pt}}p16k-...; "
                           f"move it into such a folder")
    epoch_value = raw.get("epoch")
    classes = raw.get("classes") if isinstance(raw.get("classes"), list) and not finetuned else []
    return WeightFile(path, state, model, input_size, patch_size,
                      int(epoch_value) if isinstance(epoch_value, int) else None, classes)


def _pair(value):
    if value is None:
        return None
    if isinstance(value, int):
        return [value, value]
    return [int(v) for v in value]
