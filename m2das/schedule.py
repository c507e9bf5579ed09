"""LR and EMA schedules: pure functions of the position in training, so a resumed
run recomputes exactly what an uninterrupted one would have used."""

import math


def learning_rate(epoch_float: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up to `lr` over `warmup_epochs`, then half-cosine down to `min_lr` at `epochs`."""
    if epoch_float < warmup_epochs:
        return lr * epoch_float / warmup_epochs
    progress = (epoch_float - warmup_epochs) / max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def ema_decay(batch_index: int, total_batches: int, start: float, end: float) -> float:
    """tau linear in the global batch index: `start` at 0, `end` at total_batches - 1."""
    if total_batches <= 1:
        return end
    return start + (end - start) * batch_index / (total_batches - 1)
