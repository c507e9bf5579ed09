import pytest

from m2das.schedule import ema_decay, learning_rate

LR = 3e-4 * 2048 / 256  # the paper's run: 2.4e-3


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),
    (10.0, LR / 2),       # half-way through the 20-epoch warm-up
    (20.0, LR),           # peak
    (160.0, LR / 2),      # half-way through the cosine (20 -> 300)
    (300.0, 0.0),
])
def test_learning_rate_at_known_epochs(epoch, expected):
    assert learning_rate(epoch, LR, 0.0, 20, 300) == pytest.approx(expected, abs=1e-12)


def test_learning_rate_respects_min_lr():
    assert learning_rate(300.0, LR, 1e-6, 20, 300) == pytest.approx(1e-6)


def test_ema_decay_is_linear_in_the_batch_index():
    total = 1000 * 300
    assert ema_decay(0, total, 0.99995, 0.99999) == 0.99995
    assert ema_decay(total - 1, total, 0.99995, 0.99999) == pytest.approx(0.99999, abs=1e-15)
    assert ema_decay((total - 1) / 2, total, 0.99995, 0.99999) == pytest.approx(0.99997, abs=1e-15)
