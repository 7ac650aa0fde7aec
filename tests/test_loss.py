"""The head-fused cross-entropy equals the plain logits path in value and gradients."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------------ properties (hypothesis)
def _per_token(h, w, t, ignore_index):
    """The mean over the targets not ignored of -log p(target), a row at a time, in float64."""
    terms = [
        -torch.log_softmax(h[i].double() @ w.double().t(), dim=-1)[t[i]]
        for i in range(t.numel())
        if t[i] != ignore_index
    ]
    return torch.stack(terms).mean() if terms else torch.tensor(float("nan"), dtype=torch.float64)


@settings(max_examples=60)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 9)),
    vocab=st.integers(2, 40),
    dim=st.integers(1, 12),
    chunk_rows=st.integers(1, 10),
    ignore_index=st.sampled_from([-100, -1, 0]),
    seed=st.integers(0, 2**16),
    scale=st.floats(-3, 3),
)
def test_the_loss_is_the_mean_per_token_cross_entropy_of_the_targets_not_ignored(
    shape, vocab, dim, chunk_rows, ignore_index, seed, scale
) -> None:
    """Any batch shape, vocabulary and chunking: the value is the mean over the targets not ignored of
    each token's -log p (NaN where none is left), and the gradients those of that mean (zero, not NaN,
    where nothing is left to predict)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, dim, generator=g, requires_grad=True)
    w = torch.randn(vocab, dim, generator=g, requires_grad=True)
    t = torch.randint(0, vocab, shape, generator=g)
    t = torch.where(torch.rand(shape, generator=g) < 0.3, ignore_index, t)
    before = loss_mod.CHUNK_ELEMENTS
    loss_mod.CHUNK_ELEMENTS = chunk_rows * vocab  # (chunks of `chunk_rows` rows, the last one ragged)
    try:
        ours = linear_cross_entropy(h, w, t, ignore_index=ignore_index)
    finally:
        loss_mod.CHUNK_ELEMENTS = before
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = _per_token(h2.flatten(0, -2), w2, t.flatten(), ignore_index)
    assert ours.dtype == torch.float32 and ours.shape == ()
    if not (t != ignore_index).any():
        assert ours.isnan()
        (ours.nan_to_num() * scale).backward()
        assert not h.grad.any() and not w.grad.any()
        return
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    (ours * scale).backward()
    (ref * scale).backward()
    torch.testing.assert_close(h.grad.double(), h2.grad.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w2.grad.double(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ packed documents: what the loss sees
_ROWS = st.tuples(st.integers(1, 3), st.integers(1, 14), st.integers(0, 2**16), st.floats(0, 0.5))


def _packed_row(batch: int, seq: int, seed: int, bos_share: float) -> torch.Tensor:
    """[batch, seq] ids in 1..9, BOS (0) at random places: rows of packed documents, cut anywhere."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 10, (batch, seq), generator=g)
    return ids.masked_fill(torch.rand(batch, seq, generator=g) < bos_share, 0)


@settings(max_examples=100)
@given(row=_ROWS)
def test_the_document_mask_and_positions_equal_a_brute_force_reading_of_the_row(row) -> None:
    """Token i attends to token j exactly when j <= i and no BOS opens a document in j+1..i; positions
    count from the document's BOS (from the window's start, before the first); document ids go up by one
    at each BOS."""
    from nanoseek.model.attention import document_causal_mask, documents_from_bos

    x = _packed_row(*row)
    doc_ids, positions = documents_from_bos(x, 0)
    mask = document_causal_mask(doc_ids)
    for b, ids in enumerate(x.tolist()):
        n = len(ids)
        for i in range(n):
            opened = [k for k in range(i + 1) if ids[k] == 0]
            assert positions[b, i] == i - (opened[-1] if opened else 0)
            assert doc_ids[b, i] == len(opened)
            for j in range(n):
                assert mask[b, i, j] == (j <= i and 0 not in ids[j + 1 : i + 1]), (b, i, j)


@settings(max_examples=100)
@given(row=_ROWS, depths=st.integers(1, 3), masked=st.booleans())
def test_mtp_targets_and_counts_equal_a_brute_force_reading_of_the_row(row, depths, masked) -> None:
    """MTP depth k at position i predicts the token k+1 after the main head's, unless (packed) a BOS
    opens another document in the k+1 tokens it is fed after i; the step's counts are those targets'."""
    from nanoseek.model.attention import documents_from_bos
    from nanoseek.model.transformer import mtp_targets
    from nanoseek.train.loop import target_counts

    x = _packed_row(*row)
    y = torch.cat([x[:, 1:], torch.randint(0, 10, (x.shape[0], 1))], dim=1)
    y = y.masked_fill(torch.rand(y.shape) < 0.2, -100)  # (targets masked before: a prompt's)
    doc_ids = documents_from_bos(x, 0)[0] if masked else None
    counts = [int((y != -100).sum())]
    for k in range(depths):
        got = mtp_targets(y, k, doc_ids).tolist()
        for b, ids in enumerate(x.tolist()):
            want = [
                -100 if masked and 0 in ids[i + 1 : i + k + 2] else y[b, i + k + 1].item()
                for i in range(len(ids) - k - 1)
            ]
            assert got[b] == want, (b, k)
        counts.append(sum(t != -100 for r in got for t in r))
    assert target_counts(y, depths, doc_ids=doc_ids).tolist() == counts
