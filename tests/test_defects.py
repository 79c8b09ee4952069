"""Eq. 5-8 on hand-built grids whose answers are computed by hand."""

import math

import pytest
import torch

from sinder_hub import defect_mask, neighbor_loss
from sinder_hub.defects import gaussian_kernel


def grid_with_defect(size=5, at=(2, 2), defect_norm=10.0):
    """Tokens [size, size, 2]: normal token (i, j) = (1 + 5i + j, 0); the defect points along e2."""
    tokens = torch.zeros(size, size, 2)
    for i in range(size):
        for j in range(size):
            tokens[i, j, 0] = 1 + 5 * i + j
    tokens[at] = torch.tensor([0.0, defect_norm])
    return tokens


E2 = torch.tensor([0.0, 1.0])


def test_mask_and_logits_known_answer():
    tokens = grid_with_defect()
    mask, logits = defect_mask(tokens, E2, mask_thr=4.0)
    # logits: 0 for the 24 normal tokens, -1 for the defect; mean -0.04, unbiased std 0.2,
    # threshold -0.04 - 4 * 0.2 = -0.84: only the defect is below it.
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[2, 2] = True
    assert torch.equal(mask, expected)
    assert logits[2, 2].item() == pytest.approx(-1.0)
    assert logits.sum().item() == pytest.approx(-1.0)
    # a threshold of 5 std puts it at -1.04: no defect
    assert not defect_mask(tokens, E2, mask_thr=5.0)[0].any()
    assert neighbor_loss(tokens, E2, mask_thr=5.0) is None


def test_border_tokens_are_never_defects():
    for at in [(0, 2), (4, 4), (2, 0)]:
        mask, logits = defect_mask(grid_with_defect(at=at), E2)
        assert logits[at].item() == pytest.approx(-1.0)
        assert not mask.any()
    # a 5x5 kernel widens the border to 2 tokens
    tokens = grid_with_defect(size=7, at=(1, 3))
    assert defect_mask(tokens, E2, kernel=3)[0][1, 3]
    assert not defect_mask(tokens, E2, kernel=5)[0].any()


def test_sign_and_scale_invariance():
    tokens = grid_with_defect()
    mask, logits = defect_mask(tokens, E2)
    for direction, scale in [(-E2, 1.0), (3 * E2, 1.0), (E2, 7.0)]:
        other_mask, other_logits = defect_mask(tokens * scale, direction)
        assert torch.equal(mask, other_mask)
        assert torch.allclose(logits, other_logits)


def test_neighbor_loss_known_answer():
    tokens = grid_with_defect()
    result = neighbor_loss(tokens, E2, temperature=0.1)
    # eq. 6: softmax of logits / 0.1 over the window: 1 for the 8 neighbours, e^-10 for the centre,
    # times the Gaussian [1 2 1; 2 4 2; 1 2 1], renormalised.
    gauss = [[1, 2, 1], [2, 4, 2], [1, 2, 1]]
    raw = [[gauss[a][b] * (math.exp(-10) if (a, b) == (1, 1) else 1.0) for b in range(3)] for a in range(3)]
    total = sum(map(sum, raw))
    target = [0.0, 0.0]
    for a in range(3):
        for b in range(3):
            token = tokens[1 + a, 1 + b]
            target[0] += raw[a][b] / total * token[0].item()
            target[1] += raw[a][b] / total * token[1].item()
    assert result.targets.shape == (1, 2)
    assert result.targets[0].tolist() == pytest.approx(target, rel=1e-6)
    # alpha: mean norm over the interior 3x3 (the defect included)
    interior = [1 + 5 * i + j for i in range(1, 4) for j in range(1, 4) if (i, j) != (2, 2)] + [10.0]
    alpha = sum(interior) / 9
    assert result.alpha.item() == pytest.approx(alpha)
    distance = math.dist([0.0, 10.0], target)
    assert result.loss.item() == pytest.approx(distance / alpha, rel=1e-6)


def test_loss_gradient_only_reaches_defective_tokens():
    tokens = grid_with_defect().requires_grad_(True)
    result = neighbor_loss(tokens, E2)
    result.loss.backward()
    touched = tokens.grad.abs().sum(-1) > 0
    assert torch.equal(touched, result.mask)


def test_kernel_5_known_answer():
    """The authors' 5x5 table (centre 41 of 273), not the outer product of [1, 4, 7, 4, 1] (centre 49 of 289)."""
    tokens = grid_with_defect(size=7, at=(3, 3))
    result = neighbor_loss(tokens, E2, kernel=5)
    weights = torch.tensor(
        [[1.0, 4, 7, 4, 1], [4, 16, 26, 16, 4], [7, 26, 41, 26, 7], [4, 16, 26, 16, 4], [1, 4, 7, 4, 1]]
    )
    assert gaussian_kernel(5)[2, 2].item() == pytest.approx(41 / 273)
    assert gaussian_kernel(5)[0, 2].item() == pytest.approx(7 / 273)
    weights[2, 2] *= math.exp(-10)
    weights /= weights.sum()
    expected = (weights[..., None] * tokens[1:6, 1:6]).sum((0, 1))
    assert torch.allclose(result.targets[0], expected, rtol=1e-6)
    assert torch.allclose(gaussian_kernel(5).sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="kernel must be one of"):
        gaussian_kernel(4)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\[H, W, D\]"):
        defect_mask(torch.zeros(25, 2), E2)
    with pytest.raises(ValueError, match=r"direction must have shape \[3\]"):
        defect_mask(torch.zeros(5, 5, 3), E2)
