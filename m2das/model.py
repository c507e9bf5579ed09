"""M2D-AS: Masked Modeling Duo with an AudioSet label head.

One module holds the online encoder, the predictor, the EMA target encoder
and the offline (label) head, so its state_dict has the names the published
M2D runtime and EVAR load (`patch_embed.*`, `cls_token`, `pos_embed`,
`blocks.*`, `norm.*`, `norm_stats`, ...).

The training step (see `M2DAS.forward`) in words:
  patches -> random 70% masked -> online encoder sees the visible 30% ->
  predictor fills in the masked positions -> the target encoder (an EMA of
  the online one) encodes the masked patches -> online loss compares the two;
  all 190 online tokens -> offline head -> BCE against the clip's labels.
"""

import sys
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _import_timm_block():
    """timm's ViT block, imported without the wandb that timm's package init loads when it is
    installed (for summary helpers m2das never calls): that import alone costs every start about
    2 s. `--logger wandb` imports wandb itself later, unaffected."""
    hide = "wandb" not in sys.modules
    if hide:
        sys.modules["wandb"] = None  # makes `import wandb` inside timm raise ImportError
    try:
        from timm.models.vision_transformer import Block as TimmBlock
    finally:
        if hide and sys.modules.get("wandb", 0) is None:
            del sys.modules["wandb"]
    return TimmBlock


Block = _import_timm_block()


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding, [1 + H*W, dim] with a zero row for cls.

    Patches are in row-major order (frequency row, then time column). The first
    dim/2 channels encode the column index, the last dim/2 the row index.
    """
    assert dim % 4 == 0, "embedding dim must be a multiple of 4"
    k = dim // 4
    omega = 1.0 / 10000 ** (np.arange(k, dtype=np.float64) / k)

    def encode(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([encode(cols), encode(rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens; `proj` keeps the name the runtime loads."""

    def __init__(self, patch_size, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def blocks(depth, dim, heads, mlp_ratio):
    return nn.ModuleList(
        Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        for _ in range(depth)
    )


def norm_mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos between prediction and standardised target, averaged over tokens.

    Each target token is standardised over its features (unbiased variance,
    eps 1e-6) before both are L2-normalised.
    """
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    cos = (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(-1)
    return (2 - 2 * cos).mean()


class M2DAS(nn.Module):
    def __init__(self, input_size=(80, 608), patch_size=(16, 16), embed_dim=768, depth=12,
                 num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=4.0, num_classes=527, mask_ratio=0.7, loss_off=1.0):
        super().__init__()
        self.input_size = tuple(input_size)
        self.patch_size = tuple(patch_size)
        self.grid = (input_size[0] // patch_size[0], input_size[1] // patch_size[1])
        self.num_patches = self.grid[0] * self.grid[1]
        self.mask_ratio = mask_ratio
        self.loss_off = loss_off
        self.num_classes = num_classes

        # [mean, std] of the training LMS; saved with the weights so that any
        # consumer of a checkpoint normalises exactly as training did.
        self.register_buffer("norm_stats", torch.tensor([0.0, 1.0]))

        # Own tensors first, in the order of the reference checkpoint.
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim), requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, decoder_embed_dim),
                                              requires_grad=False)

        # Online encoder.
        self.patch_embed = PatchEmbed(self.patch_size, embed_dim)
        self.blocks = blocks(depth, embed_dim, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        # Predictor.
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.decoder_blocks = blocks(decoder_depth, decoder_embed_dim, decoder_num_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, embed_dim)

        # Target encoder: same shapes, its own random init, moved only by EMA.
        self.target_blocks = blocks(depth, embed_dim, num_heads, mlp_ratio)
        self.target_norm = nn.LayerNorm(embed_dim, eps=1e-6)

        # Offline head: one frame of all frequency patches -> class logits.
        self.offline_predictor = nn.Linear(embed_dim * self.grid[0], num_classes)

        self._init_weights()
        for p in self.target_parameters():
            p.requires_grad_(False)

    # -- initialisation and EMA -------------------------------------------------

    def _init_weights(self):
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], *self.grid)[None])
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(self.decoder_pos_embed.shape[-1], *self.grid)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def target_parameters(self):
        return [*self.target_blocks.parameters(), *self.target_norm.parameters()]

    def online_counterparts(self):
        """Online parameters in the same order as `target_parameters()`."""
        return [*self.blocks.parameters(), *self.norm.parameters()]

    @torch.no_grad()
    def update_target(self, tau: float):
        """theta_t <- tau * theta_t + (1 - tau) * theta_online, in one fused foreach op."""
        torch._foreach_lerp_(self.target_parameters(), self.online_counterparts(), 1.0 - tau)

    # -- forward ----------------------------------------------------------------

    def mask_order(self, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """Per-sample random permutation of the patches [B, N]: the first `len_keep` visible, the rest masked.

        The training loop calls it before the forward: a generator object inside a compiled region
        breaks the graph, and the masks stay a function of the generator's seed alone.
        """
        return torch.rand(batch, self.num_patches, generator=generator, device=device).argsort(dim=1)

    def random_masking(self, batch: int, generator: torch.Generator | None, device):
        """(visible ids, masked ids) of `mask_order`."""
        return self.split_mask(self.mask_order(batch, generator, device))

    def split_mask(self, order: torch.Tensor):
        len_keep = int(self.num_patches * (1 - self.mask_ratio))
        return order[:, :len_keep], order[:, len_keep:]

    def normalize(self, lms: torch.Tensor) -> torch.Tensor:
        return (lms - self.norm_stats[0]) / self.norm_stats[1]

    def forward(self, lms: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | torch.Generator | None = None):
        """Normalised-by-the-model LMS [B,1,F,T] and multi-hot labels -> dict of losses.

        `mask` is a patch order from `mask_order` (what a compiled step needs), or the generator to draw one.
        """
        B = lms.shape[0]
        x = self.patch_embed(self.normalize(lms)) + self.pos_embed[:, 1:]
        order = mask if isinstance(mask, torch.Tensor) else self.mask_order(B, mask, x.device)
        visible_ids, masked_ids = self.split_mask(order)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1)

        # Online encoder on cls + visible patches.
        h = torch.cat([cls, take(x, visible_ids)], dim=1)
        for blk in self.blocks:
            h = blk(h)
        h = self.norm(h)

        # Predictor: visible tokens + mask tokens, back in patch order.
        y = self.decoder_embed(h)
        n_masked = masked_ids.shape[1]
        tokens = torch.cat([y[:, 1:], self.mask_token.expand(B, n_masked, -1)], dim=1)
        tokens = put(tokens, order)
        y = torch.cat([y[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            y = blk(y)
        pred_all = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        pred = take(pred_all, masked_ids)

        # Target encoder on cls + masked patches (no gradients anywhere in it).
        with torch.no_grad():
            t = torch.cat([cls, take(x, masked_ids)], dim=1)
            for blk in self.target_blocks:
                t = blk(t)
            target = self.target_norm(t)[:, 1:]
        loss_online = norm_mse_loss(pred.float(), target.float())

        # Offline head over all online tokens: encoder outputs where visible,
        # predictor outputs where masked.
        logits = self.offline_logits(put(torch.cat([h[:, 1:], pred], dim=1), order))
        loss_offline = F.binary_cross_entropy_with_logits(logits.float(), labels.float())

        loss = loss_online + self.loss_off * loss_offline
        return {"loss": loss, "loss_online": loss_online, "loss_offline": loss_offline}

    def offline_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, F*T patches (row-major), D] -> per-frame [B, T, F*D] -> linear -> mean over T."""
        B, _, D = tokens.shape
        frames = tokens.reshape(B, self.grid[0], self.grid[1], D).transpose(1, 2).reshape(B, self.grid[1], -1)
        return self.offline_predictor(frames).mean(dim=1)

    def flops_per_sample(self) -> dict:
        """Forward FLOPs of one training sample (matmuls, 2 per multiply-add), split into the
        parts trained by gradients and the target encoder, which only runs forward."""
        D = self.cls_token.shape[-1]
        Dd = self.mask_token.shape[-1]
        keep = int(self.num_patches * (1 - self.mask_ratio))
        masked = self.num_patches - keep

        def vit(n_tokens, dim, depth, mlp_ratio=4.0):
            per_block = 2 * n_tokens * dim * dim * (3 + 1 + 2 * mlp_ratio) + 2 * 2 * n_tokens * n_tokens * dim
            return depth * per_block

        pf, pt = self.patch_size
        online = (2 * self.num_patches * D * pf * pt
                  + vit(1 + keep, D, len(self.blocks))
                  + 2 * (1 + keep) * D * Dd
                  + vit(1 + self.num_patches, Dd, len(self.decoder_blocks))
                  + 2 * self.num_patches * Dd * D
                  + 2 * self.grid[1] * D * self.grid[0] * self.num_classes)
        return {"online": online, "target": vit(1 + masked, D, len(self.target_blocks))}

    def train_flops_per_sample(self) -> float:
        """Forward + backward (about 2x forward) of the online parts, forward of the target."""
        f = self.flops_per_sample()
        return 3 * f["online"] + f["target"]


def take(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[b, ids[b, i], :] for every b, i."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def put(tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of `take` for a full permutation: tokens[:, i] goes to position order[:, i]."""
    out = torch.empty_like(tokens)
    return out.scatter(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens)


# -- factories (timm-style names) ---------------------------------------------

# -- the frozen encoder's features (the published runtime's recipe; the monitor and downstream use it) --

def encode_tokens(vit: nn.Module, x: torch.Tensor, grid_rows: int) -> torch.Tensor:
    """Normalised LMS [B, 1, F, t] (t a multiple of the patch width, at most the training crop)
    -> all patch tokens [B, F/pf * t/pt, D], unmasked, cls dropped.

    `vit` is anything with the encoder's names (an M2DAS or an AudioEncoder);
    a short input uses the first columns of the position embedding.
    """
    tokens = vit.patch_embed(x)
    dim = tokens.shape[-1]
    cols = tokens.shape[1] // grid_rows
    pos = vit.pos_embed[:, 1:].reshape(1, grid_rows, -1, dim)[:, :, :cols].reshape(1, grid_rows * cols, dim)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
    h = torch.cat([cls, tokens + pos], dim=1)
    for blk in vit.blocks:
        h = blk(h)
    return vit.norm(h)[:, 1:]


def tokens_to_frames(tokens: torch.Tensor, grid_rows: int) -> torch.Tensor:
    """[B, rows * cols (row-major), D] -> [B, cols, rows * D]: one feature per time frame."""
    b, n, d = tokens.shape
    return tokens.reshape(b, grid_rows, n // grid_rows, d).transpose(1, 2).reshape(b, n // grid_rows, grid_rows * d)


MODEL_SIZES = {
    "m2d_as_vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "m2d_as_vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    # A few-second-per-step model for tests and the demo on 2 CPU cores.
    "m2d_as_vit_tiny": dict(embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=64,
                            decoder_depth=1, decoder_num_heads=2),
}


def create_model(name: str, **kwargs) -> M2DAS:
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_SIZES)}")
    return M2DAS(**{**MODEL_SIZES[name], **kwargs})
