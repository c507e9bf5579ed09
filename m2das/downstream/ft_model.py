"""The network fine-tuned in Table VI and what trains it: the pre-trained encoder at the task's
input length, a BatchNorm + linear head on the 3840-d clip feature, LARS, the LR schedule, the losses.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from m2das.downstream.encoder import load_encoder
from m2das.downstream.ft_config import HEAD_STD, MIN_LR, TaskSettings
from m2das.model import MODEL_SIZES, tokens_to_frames


def interpolate_pos_embed(pos: torch.Tensor, rows: int, cols: int, new_cols: int) -> torch.Tensor:
    """[1, 1 + rows*cols, D] -> [1, 1 + rows*new_cols, D]: the patch grid resized bicubically in 2-D
    (as MAE and M2D adapt a checkpoint to another input size), the cls row kept."""
    if new_cols == cols:
        return pos.clone()
    dim = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, rows, cols, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(rows, new_cols), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * new_cols, dim).to(pos.dtype)], dim=1)


class TaskHead(nn.Module):
    """BatchNorm without affine, then one linear layer (init N(0, 0.01), bias 0)."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, classes)
        nn.init.normal_(self.linear.weight, std=HEAD_STD)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(self.norm(x))


class FinetuneNet(nn.Module):
    """Encoder (the runtime's state-dict names, under `encoder.`) + task head.

    The input is one normalised window of the task's length; the clip feature is the mean of the
    3840-d frame features. `keep` ([B, K] time-column indices) drops the other columns' patches
    before the blocks: masking whole columns keeps every remaining frame's 3840-d feature.
    """

    def __init__(self, encoder: nn.Module, classes: int, columns: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = TaskHead(encoder.feature_dim, classes)
        self.columns = columns or encoder.grid[1]  # patch columns of one input (<= the positional grid's)

    def clip_features(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        enc = self.encoder
        rows = enc.grid[0]
        tokens = enc.patch_embed(x)
        b, n, d = tokens.shape
        cols = n // rows
        tokens = tokens + enc.pos_embed[:, 1:].reshape(1, rows, -1, d)[:, :, :cols].reshape(1, n, d)
        if keep is not None:
            grid = tokens.reshape(b, rows, cols, d)
            index = keep.to(tokens.device)[:, None, :, None].expand(b, rows, keep.shape[1], d)
            tokens = torch.gather(grid, 2, index).reshape(b, rows * keep.shape[1], d)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        h = torch.cat([cls, tokens], dim=1)
        for blk in enc.blocks:
            h = blk(h)
        return tokens_to_frames(enc.norm(h)[:, 1:], rows).mean(dim=1)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.clip_features(x, keep).float())


def build_net(weights, frames: int, classes: int, st: TaskSettings) -> FinetuneNet:
    """Any weights m2das.downstream.weights reads -> the network at `frames` input frames, trainable.

    The positional grid is resized to `frames` unless the task keeps the pre-trained one
    (a shorter input then uses its first columns, as the runtime does)."""
    enc = load_encoder(weights)
    rows, cols = enc.grid
    new_cols = frames // enc.patch_size[1]
    if new_cols < 1:
        raise ValueError(f"--frames {frames} is shorter than one patch ({enc.patch_size[1]} frames)")
    if st.interpolate_pos or new_cols > cols:
        pos = interpolate_pos_embed(enc.pos_embed.data, rows, cols, new_cols)
        enc.pos_embed = nn.Parameter(pos, requires_grad=False)
        enc.input_size = (enc.input_size[0], frames)
        enc.grid = (rows, new_cols)
    enc.offline_predictor = None  # the pre-training head is not part of the task network
    enc.train().requires_grad_(True)
    enc.pos_embed.requires_grad_(False)  # fixed sine-cosine, as in pre-training
    if st.freeze_embed:
        enc.patch_embed.requires_grad_(False)
    return FinetuneNet(enc, classes, new_cols)


def encoder_args(enc) -> dict:
    """What m2das.downstream.weights reads from a fine-tuned checkpoint's args to rebuild the encoder:
    its size name (matched by width and depth) and the input and patch size it was fine-tuned at."""
    dim, depth = enc.cls_token.shape[-1], len(enc.blocks)
    model = next((name for name, size in MODEL_SIZES.items()
                  if size["embed_dim"] == dim and size["depth"] == depth), None)
    return {"model": model, "input_size": list(enc.input_size), "patch_size": list(enc.patch_size)}


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al., 2017) in the form MAE and M2D use.

    For a matrix: update = grad + wd * w, scaled by trust * ||w|| / ||update|| when both norms are
    positive; vectors (biases, norms) take the plain update. Then heavy-ball momentum:
    mu <- momentum * mu + update; w <- w - lr * mu.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    one = torch.ones_like(w_norm)
                    trust = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm.clamp_min(1e-30), one)
                    update = update * trust
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(net: nn.Module, st: TaskSettings, lr: float) -> torch.optim.Optimizer:
    """One LR for every trainable parameter (no layer-wise decay), as the reference tool."""
    params = [p for p in net.parameters() if p.requires_grad]
    if st.optim == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=st.weight_decay)
    if st.optim == "lars":
        return LARS(params, lr=lr, weight_decay=st.weight_decay)
    if st.optim == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=st.weight_decay, betas=st.betas, amsgrad=True)
    raise ValueError(f"unknown optimizer {st.optim!r}")


def finetune_lr(epoch_float: float, lr: float, warmup_epochs: float, epochs: float, min_lr: float = MIN_LR) -> float:
    """Linear warm-up from 0, then cosine to `min_lr`, as timm's CosineLRScheduler (no warm-up prefix)
    steps it in the reference tool: after warm-up the cosine's phase is epoch / epochs."""
    if epoch_float < warmup_epochs:
        return lr * epoch_float / warmup_epochs
    t = min(epoch_float, epochs)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t / epochs))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """BCE-with-logits for multi-label; else the reference's soft-target NLL, -mean(y * log_softmax)."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), targets)
    return -(targets * F.log_softmax(logits.float(), dim=-1)).mean()
