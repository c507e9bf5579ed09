"""The pre-trained encoder as a feature extractor: waveform or LMS in, frame and clip features out.

Features follow the published runtime's convention, so numbers computed here
and there from the same weights agree: per time frame, the tokens of all
frequency patches are concatenated (5 x 768 = 3840-d for ViT-B); a clip longer
than the training crop (608 frames) is cut into crop-long chunks whose frames
are concatenated in time (the last chunk zero-padded to whole patches); the
clip feature is the mean over frames. A clip shorter than the crop is encoded as
it is, never padded with silence to the crop (padding is pre-training's rule for
its random crops, not the runtime's).
"""

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from m2das.data import audio
from m2das.model import MODEL_SIZES, PatchEmbed, blocks, encode_tokens, tokens_to_frames
from m2das.downstream.weights import HEAD_PREFIX, WeightsError, read_weights


class Features(NamedTuple):
    frames: torch.Tensor  # [B, T', F/pf * D]
    clip: torch.Tensor    # [B, F/pf * D]


class AudioEncoder(nn.Module):
    """The online encoder of M2D-AS with the state-dict names of the published runtime.

    `encoder(lms)` takes LMS as `m2das prepare` writes them ([B, 1, 80, T] or
    [B, 80, T], not normalised); `encoder(wave, sample_rate=sr)` takes
    waveforms at any rate ([samples], [B, samples] or [B, channels, samples]).
    Both return Features(frames, clip).
    """

    def __init__(self, input_size=(80, 608), patch_size=(16, 16), embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_classes=0):
        super().__init__()
        self.input_size, self.patch_size = tuple(input_size), tuple(patch_size)
        self.grid = (input_size[0] // patch_size[0], input_size[1] // patch_size[1])
        self.register_buffer("norm_stats", torch.tensor([0.0, 1.0]))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim), requires_grad=False)
        self.patch_embed = PatchEmbed(self.patch_size, embed_dim)
        self.blocks = blocks(depth, embed_dim, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.offline_predictor = nn.Linear(embed_dim * self.grid[0], num_classes) if num_classes else None
        self.classes: list = []

    @property
    def feature_dim(self) -> int:
        return self.grid[0] * self.cls_token.shape[-1]

    def to_lms(self, wave, sample_rate: int) -> torch.Tensor:
        """Waveforms -> LMS [B, 1, 80, T], made as `m2das prepare` makes them but without its 6.1-s
        minimum: the runtime encodes a short clip as it is (a 1-s clip is 101 frames)."""
        x = torch.as_tensor(wave, dtype=torch.float32)
        if x.dim() == 1:
            x = x[None]
        device = self.norm_stats.device
        mono = [audio.to_mono_16k(item, sample_rate, device) for item in x]
        return torch.from_numpy(np.stack(audio.lms_batch_16k(mono, device, pad=False))).to(device)

    def frame_features(self, lms: torch.Tensor) -> torch.Tensor:
        """LMS [B, 1, F, T] -> [B, T', F/pf * D], chunked at the training crop length."""
        if lms.dim() == 3:
            lms = lms[:, None]
        x = (lms.to(self.norm_stats.device, torch.float32) - self.norm_stats[0]) / self.norm_stats[1]
        unit, width = self.input_size[1], self.patch_size[1]
        x = nn.functional.pad(x, (0, (-x.shape[-1]) % width))
        chunks = [x[..., s:s + unit] for s in range(0, x.shape[-1], unit)]
        return torch.cat([tokens_to_frames(encode_tokens(self, c, self.grid[0]), self.grid[0]) for c in chunks], dim=1)

    def forward(self, x: torch.Tensor, sample_rate: int | None = None) -> Features:
        lms = x if sample_rate is None else self.to_lms(x, sample_rate)
        frames = self.frame_features(lms)
        return Features(frames, frames.mean(dim=1))

    def tag(self, x: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """Class probabilities [B, classes] from the AudioSet head (an export made with --with-head)."""
        if self.offline_predictor is None:
            raise RuntimeError("these weights have no AudioSet head; export with `m2das export --with-head`")
        lms = x if sample_rate is None else self.to_lms(x, sample_rate)
        return torch.sigmoid(self.offline_predictor(self.frame_features(lms)).mean(dim=1))


def load_sized(module, state: dict, path, strict: bool = True) -> None:
    """load_state_dict, with a size mismatch (weights of another model or input size than their
    args or folder name say) as a WeightsError: one line naming the file and the first tensor."""
    try:
        module.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        said = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "Missing key" in ln
                or "Unexpected key" in ln] or [str(e).splitlines()[0]]
        raise WeightsError(f"{path}: these weights do not fit the model their args or folder name describe "
                           f"({said[0].rstrip('.')}); export them again from their run folder") from None


def load_encoder(path, device="cpu", epoch: int | None = None) -> AudioEncoder:
    """An exported encoder, a full checkpoint or a run folder -> AudioEncoder on `device`.

    Frozen (eval mode, no gradients) because it is meant for features; call
    `.train().requires_grad_(True)` on it to fine-tune.
    """
    w = read_weights(path, epoch)
    state = {k: v for k, v in w.encoder_state(with_head=True).items()}
    dim = state["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    size = MODEL_SIZES.get(w.model or "", {})
    heads = size.get("num_heads", 12) if size.get("embed_dim", 768) == dim else max(dim // 64, 1)
    head = state.get(HEAD_PREFIX + "weight")
    encoder = AudioEncoder(w.input_size, w.patch_size, dim, depth, heads,
                           num_classes=head.shape[0] if head is not None else 0)
    load_sized(encoder, state, w.path, strict=True)
    encoder.classes = list(w.classes)
    return encoder.to(device).eval().requires_grad_(False)
