"""A tiny M2D-AS checkpoint in the trainer's file format, and a small labelled audio corpus.

The checkpoint is trained in-process for a few steps on the corpus (seconds on
2 cores), so tests of export, embeddings, evaluation and the monitor work on
real files without running the trainer.
"""

from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from m2das.data.audio import lms_from_waveform
from m2das.tools.demo import CLASSES, synth
from m2das.data.stats import crop_or_pad

RUN_NAME = "m2d_as_vit_tiny-80x208p16x16p16k-261124-M2DASe2b8s3off1htest0"
TINY = dict(model="m2d_as_vit_tiny", input_size=[80, 208], patch_size=[16, 16])
KINDS = [mid for mid, _ in CLASSES]


def write_corpus(folder: Path, per_class: int = 8, seconds: float = 2.0, seed: int = 0, sample_rate: int = 16000):
    """folder/*.wav, per_class clips of each demo class; returns [(path, class mid)]."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for k, kind in enumerate(KINDS):
        for i in range(per_class):
            wave = synth(kind, seconds, rng, sample_rate)
            wave = 0.3 * wave / (np.abs(wave).max() + 1e-9) + 0.003 * rng.standard_normal(wave.size)
            path = folder / f"c{k}_{i:02d}.wav"
            sf.write(path, wave.astype(np.float32), sample_rate)
            clips.append((path, kind))
    return clips


def write_eval_list(csv: Path, clips, relative_to: Path) -> Path:
    """file_name,label,split with the per-class order: most train, then one valid, one-two test."""
    rows = ["file_name,label,split"]
    counts: dict = {}
    for path, kind in clips:
        n = counts[kind] = counts.get(kind, -1) + 1
        split = "valid" if n % 4 == 1 else "test" if n % 4 == 3 else "train"
        rows.append(f"{path.relative_to(relative_to)},{kind},{split}")
    csv.write_text("\n".join(rows) + "\n")
    return csv


def make_checkpoint(runs: Path, clips=(), steps: int = 0, epoch: int = 2, seed: int = 0) -> Path:
    """runs/RUN_NAME/checkpoint-{epoch}.pth: the model trained `steps` Adam steps on crops of `clips`."""
    from m2das.model import create_model

    torch.manual_seed(seed)
    model = create_model(TINY["model"], input_size=TINY["input_size"], num_classes=len(KINDS))
    lms = [lms_from_waveform(sf.read(p, dtype="float32")[0], 16000) for p, _ in clips]
    if lms:
        stacked = np.concatenate([x.ravel() for x in lms])
        model.norm_stats.copy_(torch.tensor([stacked.mean(), stacked.std()]))
    if steps:
        rng = np.random.default_rng(seed)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            pick = rng.choice(len(lms), size=8, replace=False)
            x = torch.from_numpy(np.stack([crop_or_pad(lms[i], 208, int(rng.integers(0, lms[i].shape[-1] - 208)))
                                           for i in pick]))
            y = torch.zeros(8, len(KINDS))
            y[torch.arange(8), torch.tensor([KINDS.index(clips[i][1]) for i in pick])] = 1
            loss = model(x, y, gen)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.update_target(0.99)
    run = runs / RUN_NAME
    run.mkdir(parents=True, exist_ok=True)
    path = run / f"checkpoint-{epoch}.pth"
    args = {**TINY, "epochs": epoch, "batch_size": 8, "seed": 3, "output_dir": str(run)}
    torch.save({"model": model.state_dict(), "epoch": epoch, "args": args, "classes": list(KINDS)}, path)
    return path
