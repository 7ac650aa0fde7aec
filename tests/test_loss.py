"""The head-fused cross-entropy equals the plain logits path in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model import loss as loss_mod
from nanoseek.model.loss import linear_cross_entropy


def _reference(h, w, t, ignore_index=-100):
    return F.cross_entropy((h @ w.t()).float().flatten(0, -2), t.flatten(), ignore_index=ignore_index)


@pytest.mark.parametrize("chunk_elements", [1 << 20, 7 * 50])  # one chunk; ragged chunks of 7 rows
def test_value_and_gradients_match_plain_cross_entropy(monkeypatch, chunk_elements):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (3, 11), generator=g)
    t[0, :4] = -100  # ignored positions contribute nothing and do not count in the mean
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ours = linear_cross_entropy(h, w, t)
    ref = _reference(h2, w2, t)
    assert torch.allclose(ours, ref, atol=1e-5)
    (ours * 2.5).backward()
    (ref * 2.5).backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-5)
    assert torch.allclose(w.grad, w2.grad, atol=1e-5)


@pytest.mark.parametrize("trained", ["head", "hidden"])
def test_gradients_when_only_one_side_is_trained(trained):
    """A frozen trunk under a trained head (a probe), or a frozen head: the side that takes a gradient
    gets the plain path's, the other none."""
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(2, 5, 16, generator=g), torch.randn(30, 16, generator=g)
    t = torch.randint(0, 30, (2, 5), generator=g)
    x = w if trained == "head" else h
    x.requires_grad_()
    linear_cross_entropy(h, w, t).backward()
    x2 = x.detach().clone().requires_grad_()
    (_reference(h, x2, t) if trained == "head" else _reference(x2, w, t)).backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert (w if trained == "hidden" else h).grad is None


def test_no_grad_and_all_ignored():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    t = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(h, w, t), _reference(h, w, t), atol=1e-6)
    assert torch.isnan(linear_cross_entropy(h, w, torch.full((4,), -100)))
    # nothing to predict: NaN as F.cross_entropy, and as its, zero gradients (not NaN ones)
    h.requires_grad_()
    (linear_cross_entropy(h, w, torch.full((4,), -100)).nan_to_num() * 0).backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(h, w, t[:3])


def test_bf16_autocast_close_to_plain():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(40, 32, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, t)
    ours.backward()
    ref = _reference(h.detach(), w.detach(), t)
    assert abs(ours.item() - ref.item()) < 0.05 * ref.item()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


@pytest.mark.parametrize("bad", [-5, -1, 10])
def test_a_target_outside_the_vocabulary_is_refused_not_trained_as_another_id(bad):
    """Only `ignore_index` is skipped: another negative id (e.g. -1 for a pipeline that ignores with
    -1) fails as F.cross_entropy fails, not trained as id 0 (BOS)."""
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
    targets = torch.tensor([3, bad, -100, 2])
    with pytest.raises((IndexError, RuntimeError)):
        F.cross_entropy(h @ w.T, targets)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        linear_cross_entropy(h, w, targets)
