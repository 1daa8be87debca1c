"""The DAGE loss (MegaSR Eq. 3, 5, 6) against values computed by hand on tiny tensors.

The extractor tests only show that gradients flow; these pin the numbers, so a wrong reduction, a
missing output weight, an undetached teacher, a SILog with the wrong lambda or sign, or a
segmentation loss on the wrong axis fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from megasr.dage import DageOutput, dage_loss, feature_l1_loss
from megasr.dage.depth import silog_loss


def _features() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    s = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([0.0, 0.0, 0.0, 6.0])]
    t = [torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([0.0, 0.0, 0.0, 0.0])]
    return s, t


def test_feature_term_is_the_mean_of_per_representation_l1() -> None:
    """Eq. 3/5: mean over representations of each one's mean |s - t| (catches a sum, or one global mean)."""
    s, t = _features()
    # |s - t|: (0, 1, 2, 3) -> mean 1.5, and 8 values (0, ..., 0, 8) -> mean 1.0; equal weight per representation.
    s[1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 8.0])
    t[1] = torch.zeros(8)
    value = feature_l1_loss(s, t)
    assert value.item() == pytest.approx((1.5 + 1.0) / 2)  # a global mean would be 14 / 12
    with pytest.raises(ValueError, match="differ in length"):
        feature_l1_loss(s, t[:1])


def test_silog_matches_the_eigen_formula() -> None:
    """SILog = sqrt(mean d^2 - 0.5 mean(d)^2), d = log p - log t, per image then averaged."""
    pred = torch.tensor([[[[1.0, math.e]]], [[[math.e**2, 1.0]]]])
    target = torch.ones_like(pred)
    # image 0: d = (0, 1): mean d^2 = 0.5, mean d = 0.5 -> sqrt(0.5 - 0.125); image 1: d = (2, 0): sqrt(2 - 0.5)
    expected = (math.sqrt(0.375) + math.sqrt(1.5)) / 2
    assert silog_loss(pred, target).item() == pytest.approx(expected, rel=1e-5)
    # scale invariance at lambda = 1 and not at 0.5: a global factor shifts d by a constant
    assert silog_loss(pred * 3, target, lambd=1.0).item() == pytest.approx(silog_loss(pred, target, lambd=1.0).item())
    assert silog_loss(pred * 3, target).item() != pytest.approx(silog_loss(pred, target).item())


def _out(map_: torch.Tensor, raw: torch.Tensor, feats: list[torch.Tensor]) -> DageOutput:
    return DageOutput(map=map_, raw=raw, features=feats)


def test_total_is_feature_plus_weighted_output_for_every_kind() -> None:
    """Eq. 6: L = L_feat + w * L_out, with each kind's output term (catches a dropped or unapplied weight)."""
    s_f, t_f = _features()
    feat = feature_l1_loss(s_f, t_f).item()
    hed_s, hed_t = torch.tensor([[[[0.2, 0.8]]]]), torch.tensor([[[[0.0, 1.0]]]])
    hed = dage_loss("hed", _out(hed_s, hed_s, s_f), _out(hed_t, hed_t, t_f), output_weight=2.0)
    assert hed["output"].item() == pytest.approx(0.2)
    assert hed["loss"].item() == pytest.approx(feat + 2.0 * 0.2)

    scores = torch.tensor([[[[3.0]], [[1.0]]]])  # student, two classes at one pixel: p = (0.75, 0.25)
    teacher_scores = torch.tensor([[[[1.0]], [[3.0]]]])  # the teacher's label there is class 1
    s_label, t_label = torch.tensor([[[0]]]), torch.tensor([[[1]]])
    seg = dage_loss("seg", _out(s_label, scores, s_f), _out(t_label, teacher_scores, t_f), output_weight=0.5)
    # Eq. 5, L1 on the outputs: distributions (0.75, 0.25) vs (0.25, 0.75) -> mean |diff| 0.5 (the old NLL of the
    # teacher's argmax gave -log 0.25 = 1.386)
    assert seg["output"].item() == pytest.approx(0.5, rel=1e-5)
    assert seg["loss"].item() == pytest.approx(feat + 0.5 * 0.5, rel=1e-5)
    scaled = dage_loss("seg", _out(s_label, scores * 7, s_f), _out(t_label, teacher_scores * 3, t_f))
    assert scaled["output"].item() == pytest.approx(0.5, rel=1e-5)  # compares distributions, not raw scores

    tok_s, tok_t = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    clip = dage_loss("clip", _out(tok_s, tok_s, s_f), _out(tok_t, tok_t, t_f), output_weight=3.0)
    # Eq. 6 sums the CLIP intermediate term over the layers (1.5 + 1.5 here); the other kinds average (Eq. 3/5)
    assert clip["feature"].item() == pytest.approx(feature_l1_loss(s_f, t_f, "sum").item()) == pytest.approx(3.0)
    assert clip["loss"].item() == pytest.approx(3.0 + 3.0)


def test_teacher_is_detached_and_the_student_gets_the_gradient() -> None:
    """The HR branch is a frozen teacher (Eq. 3): no gradient may reach its tensors."""
    s_raw = torch.tensor([[[[0.2, 0.9]]]], requires_grad=True)
    t_raw = torch.tensor([[[[0.5, 0.5]]]], requires_grad=True)
    s_feat = [torch.ones(2, requires_grad=True)]
    t_feat = [torch.zeros(2, requires_grad=True)]
    loss = dage_loss("depth", _out(s_raw, s_raw, s_feat), _out(t_raw, t_raw, t_feat))["loss"]
    loss.backward()
    assert t_raw.grad is None and t_feat[0].grad is None
    assert s_raw.grad is not None and s_raw.grad.abs().sum() > 0
    torch.testing.assert_close(s_feat[0].grad, torch.full((2,), 0.5))  # d/ds mean|s - t| = sign / n
