import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED
from m2das.model import create_model, norm_mse_loss, sincos_pos_embed


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return create_model("m2d_as_vit_base")


def read_tsv(path):
    rows = path.read_text().strip().splitlines()[1:]
    return {name: [int(v) for v in shape.strip("[]").split(",")] for name, shape in (r.split("\t") for r in rows)}


def test_base_state_dict_matches_reference_layout(base):
    reference = read_tsv(SHARED / "docs" / "m2d-as-state-dict.tsv")
    ours = {k: list(v.shape) for k, v in base.state_dict().items()}
    assert ours == reference
    # Model sizes stated for C = 527: 198.6 M parameter values, 113.3 M trainable.
    assert round(sum(p.numel() for p in base.parameters()) / 1e6, 1) == 198.6
    assert round(sum(p.numel() for p in base.parameters() if p.requires_grad) / 1e6, 1) == 113.3


def test_large_variant_dimensions():
    with torch.device("meta"):  # shapes only: no memory, no init cost
        m = create_model("m2d_as_vit_large", num_classes=10)
    sd = m.state_dict()
    assert sd["blocks.23.attn.qkv.weight"].shape == (3072, 1024)
    assert sd["target_blocks.23.norm2.weight"].shape == (1024,)
    assert sd["decoder_embed.weight"].shape == (512, 1024)
    assert sd["offline_predictor.weight"].shape == (10, 5 * 1024)


def test_masking_keeps_57_of_190_and_encoder_sees_them():
    base = create_model("m2d_as_vit_tiny", input_size=(80, 608))  # same 5 x 38 grid as base, cheaper
    g = torch.Generator().manual_seed(1)
    visible, masked = base.random_masking(3, g, "cpu")
    assert visible.shape == (3, 57) and masked.shape == (3, 133)
    for b in range(3):  # a permutation per sample
        assert sorted(torch.cat([visible[b], masked[b]]).tolist()) == list(range(190))
    assert not torch.equal(visible[0], visible[1])
    seen = []
    hooks = [base.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(("online", a[0].shape[1]))),
             base.target_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(("target", a[0].shape[1]))),
             base.decoder_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(("pred", a[0].shape[1])))]
    with torch.no_grad():
        base(torch.randn(2, 1, 80, 608), torch.zeros(2, 527), torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    assert dict(seen) == {"online": 1 + 57, "target": 1 + 133, "pred": 1 + 190}


def test_norm_mse_against_hand_value():
    # target [2, 4, 6]: mean 4, unbiased var 4 -> standardised [-1, 0, 1] -> unit [-1, 0, 1]/sqrt2.
    pred = torch.tensor([[[1.0, 0.0, 0.0]]])
    target = torch.tensor([[[2.0, 4.0, 6.0]]])
    assert norm_mse_loss(pred, target).item() == pytest.approx(2 + 2 / math.sqrt(2), abs=1e-5)
    # Identical direction -> 0; scale of the prediction does not matter.
    assert norm_mse_loss(torch.tensor([[[-3.0, 0.0, 3.0]]]), target).item() == pytest.approx(0.0, abs=1e-5)


def test_offline_head_averages_frames_of_frequency_major_features():
    m = create_model("m2d_as_vit_tiny", num_classes=2)
    D, (Fg, Tg) = m.cls_token.shape[-1], m.grid
    tokens = torch.zeros(1, Fg * Tg, D)
    tokens[0, :, 0] = torch.arange(Fg * Tg, dtype=torch.float32)  # feature 0 = patch index
    with torch.no_grad():
        m.offline_predictor.weight.zero_()
        m.offline_predictor.bias.zero_()
        m.offline_predictor.weight[0, 1 * D + 0] = 1.0  # class 0 reads feature 0 of frequency row 1
        m.offline_predictor.weight[1, 0] = 2.0          # class 1 reads 2 x feature 0 of row 0
        logits = m.offline_logits(tokens)
    # Row f, column t holds f * Tg + t; the mean over t of (Tg + t) is Tg + (Tg - 1) / 2.
    assert logits[0, 0].item() == pytest.approx(Tg + (Tg - 1) / 2)
    assert logits[0, 1].item() == pytest.approx(2 * (Tg - 1) / 2)


def test_total_loss_is_online_plus_weighted_offline():
    torch.manual_seed(0)
    m = create_model("m2d_as_vit_tiny", input_size=(80, 208), num_classes=3, loss_off=0.5)
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    out = m(torch.randn(1, 1, 80, 208), labels, torch.Generator().manual_seed(0))
    assert out["loss"].item() == pytest.approx(out["loss_online"].item() + 0.5 * out["loss_offline"].item(), rel=1e-6)
    # BCE with logits at a hand value: logits (0, 2) vs labels (1, 0).
    hand = (math.log(2) + math.log(1 + math.e ** 2)) / 2
    assert F.binary_cross_entropy_with_logits(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])).item() == \
        pytest.approx(hand)


def test_gradients_reach_online_parts_only():
    torch.manual_seed(0)
    m = create_model("m2d_as_vit_tiny", input_size=(80, 208), num_classes=3)
    m(torch.randn(2, 1, 80, 208), torch.ones(2, 3), torch.Generator().manual_seed(0))["loss"].backward()
    assert all(p.grad is None for p in m.target_parameters())
    assert m.pos_embed.grad is None and m.decoder_pos_embed.grad is None
    for name in ("patch_embed.proj.weight", "cls_token", "mask_token", "blocks.0.attn.qkv.weight",
                 "decoder_pred.weight", "offline_predictor.weight"):
        assert m.get_parameter(name).grad.abs().sum() > 0, name


def test_ema_update_formula():
    m = create_model("m2d_as_vit_tiny", num_classes=2)
    online = m.blocks[0].mlp.fc1.weight.detach().clone()
    target = m.target_blocks[0].mlp.fc1.weight.detach().clone()
    assert not torch.equal(online, target)  # independent init, not a copy
    m.update_target(0.9)
    expected = 0.9 * target + 0.1 * online
    assert torch.allclose(m.target_blocks[0].mlp.fc1.weight, expected, atol=1e-7)
    assert torch.equal(m.blocks[0].mlp.fc1.weight, online)


def test_sincos_position_embedding_formula():
    emb = sincos_pos_embed(8, 2, 3).numpy()  # k = 2, w = [1, 1/100]
    assert emb.shape == (1 + 6, 8)
    assert np.all(emb[0] == 0)
    row, col = 1, 2
    p = 1 + row * 3 + col
    w = np.array([1.0, 0.01])
    np.testing.assert_allclose(emb[p, :4], np.concatenate([np.sin(col * w), np.cos(col * w)]), atol=1e-6)
    np.testing.assert_allclose(emb[p, 4:], np.concatenate([np.sin(row * w), np.cos(row * w)]), atol=1e-6)


def test_initialisation(base):
    fan_in, fan_out = 768, 2304
    bound = math.sqrt(6 / (fan_in + fan_out))
    w = base.blocks[0].attn.qkv.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(base.blocks[0].attn.qkv.bias == 0)
    assert torch.all(base.norm.weight == 1) and torch.all(base.norm.bias == 0)
    assert base.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    pe_bound = math.sqrt(6 / (256 + 768))
    assert base.patch_embed.proj.weight.abs().max() <= pe_bound


def test_training_forward_compiles_without_graph_break_and_keeps_the_masks():
    """The mask is drawn before the forward (train_step's way): the compiled forward is one graph, and
    its losses equal those of the forward drawing from the same (seed, rank, batch) generator itself."""
    import torch._dynamo

    from m2das.train import mask_generator

    torch.manual_seed(0)
    m = create_model("m2d_as_vit_tiny", input_size=(80, 208), num_classes=3)
    lms, labels = torch.randn(2, 1, 80, 208), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    mask = m.mask_order(2, mask_generator("cpu", 7, 1, 12), "cpu")
    explained = torch._dynamo.explain(m)(lms, labels, mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()
    drawn_inside = m(lms, labels, mask_generator("cpu", 7, 1, 12))
    drawn_before = m(lms, labels, mask)
    for key in ("loss_online", "loss_offline"):
        assert torch.equal(drawn_before[key], drawn_inside[key]), key
    other = m(lms, labels, m.mask_order(2, mask_generator("cpu", 7, 1, 13), "cpu"))
    assert not torch.equal(other["loss_online"], drawn_before["loss_online"])  # the batch index matters
