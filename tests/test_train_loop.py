"""The shared Trainer: schedules, decay groups, MTP loss alignment, guard, balancing, exact resume,
atomic checkpoints. Micro models (a few thousand parameters) keep each test around a second."""

from __future__ import annotations

import functools
import json
import math
import random
import shutil
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.checkpoint import build_model, load_model
from nanoseek.config import get_preset
from nanoseek.metrics import read_metrics
from nanoseek.model.transformer import cross_entropy
from nanoseek.train.loop import (
    OptimConfig,
    StepLog,
    StepTargets,
    Trainer,
    language_model_loss,
    lr_multiplier,
    param_groups,
    target_counts,
)
from nanoseek.train.pretrain import PretrainConfig

VOCAB = 32


@pytest.fixture(autouse=True)
def _one_thread():
    # Micro models gain nothing from a second thread, and on a shared, oversubscribed machine OpenMP's
    # spin-waiting makes 2 threads ~50x slower than 1 for matmuls this small.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def micro_model(seed: int = 0, mtp: int = 1):
    cfg = get_preset("tiny").replace(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=mtp,
        max_position_embeddings=64,
    )
    return build_model(cfg).init_weights(seed)


def batch_at(index: int, batch: int = 4, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable stream: each row counts up by a fixed stride from a random start; same index, same batch."""
    g = torch.Generator().manual_seed(1000 + index)
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    stride = torch.randint(1, 4, (batch, 1), generator=g)
    row = (start + stride * torch.arange(seq + 1)) % VOCAB
    return row[:, :-1], row[:, 1:]


class Stream:
    """Deterministic batches with a saveable position, like PackedDataset."""

    def __init__(self) -> None:
        self.pos = 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.pos += 1
        return batch_at(self.pos - 1)

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.pos = s["pos"]


def make_trainer(model, tmp_path, steps=10, **kw) -> Trainer:
    kw.setdefault("precision", "fp32")
    optim = kw.pop("optim", OptimConfig(lr=1e-2, warmup_steps=2))
    model.set_balance_alpha(1e-4)
    return Trainer(model, tmp_path, "pretrain", optim, total_steps=steps, **kw)


# --------------------------------------------------------------- schedule
def test_schedules_warmup_cosine_wsd_constant() -> None:
    cos = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, cos) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, cos) == pytest.approx(1.0)
    assert lr_multiplier(100, 100, cos) == pytest.approx(0.1)
    mids = [lr_multiplier(s, 100, cos) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(mids, mids[1:], strict=False))
    wsd = OptimConfig(warmup_steps=10, schedule="wsd", min_lr_ratio=0.1, decay_fraction=0.2)
    assert [lr_multiplier(s, 100, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert 0.1 < lr_multiplier(90, 100, wsd) < 1.0
    assert lr_multiplier(100, 100, wsd) == pytest.approx(0.1)
    const = OptimConfig(warmup_steps=0, schedule="constant")
    assert lr_multiplier(99, 100, const) == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
@pytest.mark.parametrize(("total", "warmup"), [(10, 2), (100, 10), (7, 0)])
def test_the_last_step_trains_at_the_floor(schedule, total, warmup) -> None:
    """Step total-1 is the last one run: it, not the step after it, is where the decay ends."""
    cfg = OptimConfig(warmup_steps=warmup, schedule=schedule, min_lr_ratio=0.1, decay_fraction=0.2)
    lrs = [lr_multiplier(s, total, cfg) for s in range(total)]
    assert lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :], strict=False))
    if warmup:
        assert lrs[warmup - 1] == pytest.approx(1.0)


def test_optim_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(ValueError, match="lr"):
        OptimConfig(lr=0)
    # NaN compares false with everything: a NaN clip or decay would pass `< 0` and turn every weight to
    # NaN on the first step, which the guard (checking the norm before clipping) accepts
    for bad in (dict(grad_clip=math.nan), dict(weight_decay=math.nan), dict(weight_decay=math.inf)):
        with pytest.raises(ValueError, match="weight_decay and grad_clip must be >= 0"):
            OptimConfig(**bad)
    assert OptimConfig(grad_clip=math.inf).grad_clip == math.inf  # no clipping, as 0 is


def test_no_decay_on_norms_and_embeddings() -> None:
    model = micro_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in nd
    assert all(n.endswith("norm.weight") or "embed" in n for n in nd)
    assert {n for n, p in model.named_parameters() if p.ndim < 2} <= nd  # every norm, none decayed
    assert "lm_head.weight" in {names[id(p)] for p in decay["params"]}


# -------------------------------------------------------------- objective
def test_mtp_loss_targets_are_shifted_one_further() -> None:
    model = micro_model()
    x, y = batch_at(0)
    loss, m = language_model_loss(model, x, y, mtp_weight=0.5)
    logits, hidden = model(x, return_hidden=True)
    (mtp,) = model.mtp_logits(hidden, x)
    # depth 0 at position i predicts x[i+2] == y[i+1]
    expected_mtp = cross_entropy(mtp, y[:, 1:])
    assert torch.allclose(m["mtp_loss"], expected_mtp)
    assert torch.allclose(loss, cross_entropy(logits, y) + 0.5 * expected_mtp, atol=1e-6)
    assert m["tokens"] == x.numel()


def test_mtp_targets_stay_inside_packed_documents() -> None:
    """With the document mask, MTP depth k at a document's last k+1 positions is fed the next
    document's tokens while attending only to its own: those positions predict nothing, and the
    step's target counts leave them out (as Megatron-LM rolls MTP labels per document)."""
    model = micro_model(mtp=2)
    row = torch.tensor([[0, 11, 12, 13, 14, 15, 0, 21, 22, 23, 24, 25, 26]])  # BOS a.. BOS b..
    x, y = row[:, :-1], row[:, 1:]
    loss, m = language_model_loss(model, x, y, mtp_weight=1.0, document_mask=True)
    from nanoseek.model.attention import document_causal_mask, documents_from_bos

    doc_ids, positions = documents_from_bos(x, 0)
    with torch.no_grad():
        _, hidden = model(x, positions, mask=document_causal_mask(doc_ids), return_hidden=True)
        d0, d1 = model.mtp_logits(hidden, x, positions, document_causal_mask(doc_ids))
    # a's last position (5) is fed b's BOS: depth 0 there would guess b1 from a's context;
    # depth 1 loses a's last two positions. Predicting the next BOS stays, as for the main head.
    t0 = torch.tensor([[12, 13, 14, 15, 0, -100, 22, 23, 24, 25, 26]])
    t1 = torch.tensor([[13, 14, 15, 0, -100, -100, 23, 24, 25, 26]])
    expected = (cross_entropy(d0, t0) + cross_entropy(d1, t1)) / 2
    torch.testing.assert_close(m["mtp_loss"], expected)
    from nanoseek.train.loop import target_counts

    assert target_counts(y, 2, doc_ids=doc_ids).tolist() == [12, 10, 8]
    assert target_counts(y, 2).tolist() == [12, 11, 10]  # one unpacked sequence


def test_document_mask_needs_a_bos() -> None:
    """A model whose config has no BOS cannot split packed rows into documents: said so, not an
    AttributeError from inside the split."""
    model = micro_model()
    model.config = model.config.replace(bos_token_id=None)
    x = torch.tensor([[0, 11, 12, 0, 21, 22]])
    with pytest.raises(ValueError, match="no BOS"):
        language_model_loss(model, x[:, :-1], x[:, 1:], document_mask=True)


def test_each_mtp_depths_loss_is_logged_in_metrics_jsonl(tmp_path) -> None:
    """With two MTP depths, metrics.jsonl holds each depth's loss beside their mean: the mean alone
    could not tell a depth that lags (depth 1 predicts two tokens further on) from one that learns."""
    model = micro_model(mtp=2)
    x, y = batch_at(0)
    _, m = language_model_loss(model, x, y, mtp_weight=0.3)
    with torch.no_grad():
        _, hidden = model(x, return_hidden=True)
        d0, d1 = model.mtp_logits(hidden, x)
    torch.testing.assert_close(m["mtp0_loss"], cross_entropy(d0, y[:, 1:]))
    torch.testing.assert_close(m["mtp1_loss"], cross_entropy(d1, y[:, 2:]))
    torch.testing.assert_close(m["mtp_loss"], (m["mtp0_loss"] + m["mtp1_loss"]) / 2)
    tr = make_trainer(model, tmp_path, steps=1)
    log = StepLog.for_trainer(tr, progress=False)
    log.step(tr.step(lambda: language_model_loss(model, x, y, mtp_weight=0.3)))
    log.close()
    (record,) = read_metrics(tmp_path, stage="pretrain")
    assert record["mtp_loss"] == pytest.approx((record["mtp0_loss"] + record["mtp1_loss"]) / 2)
    # one depth: its loss is mtp_loss itself, not logged twice
    assert "mtp0_loss" not in language_model_loss(micro_model(), x, y, mtp_weight=0.3)[1]


def test_an_mtp_depth_without_targets_leaves_the_others_their_loss() -> None:
    """Without `step` (ablate, the learning benchmark), a batch where one MTP depth has no target and
    another has one dropped the whole MTP term (the empty depth's mean is NaN): it must add 0 and keep
    the other depth's, as the same batch does with `step`."""
    from nanoseek.train.loop import StepTargets, target_counts

    model = micro_model(mtp=2)
    assert target_counts(torch.tensor([[-100, 12, -100, -100, -100, -100]]), 2).tolist() == [1, 1, 0]
    x = torch.tensor([[0, 11, 12, 13, 14, 15]])
    y = torch.full_like(x, -100)
    y[0, 1] = 12  # depth 0 at position 0 predicts it; depth 1 would need position -1: no target
    loss, m = language_model_loss(model, x, y, mtp_weight=1.0)
    stepped, ms = language_model_loss(
        model, x, y, mtp_weight=1.0, step=StepTargets(target_counts(y, 2), micro_batches=1)
    )
    assert torch.isfinite(m["mtp_loss"]) and m["mtp_loss"] > 0
    torch.testing.assert_close(loss, stepped)
    torch.testing.assert_close(m["mtp_loss"], ms["mtp_loss"])


def test_each_micro_batch_adds_its_share_of_the_balance_loss() -> None:
    """With `step`, the balance loss (a mean over sequences) is divided by the step's micro-batches, as
    the cross-entropy is its share: the micro-batch losses sum to one step's balance loss, not N of them."""
    from nanoseek.train.loop import StepTargets, target_counts

    model = micro_model().train()
    model.set_balance_alpha(0.01)
    x, y = batch_at(0)
    plain, m = language_model_loss(model, x, y)
    halved, _ = language_model_loss(model, x, y, step=StepTargets(2 * target_counts(y, 1), micro_batches=2))
    assert m["balance_loss"] > 0
    # the same batch as half of a step: its cross-entropy counts 1/2 (its targets over the step's,
    # counted twice), and its balance loss 1/2
    torch.testing.assert_close(halved, plain / 2)


# ------------------------------------------------------------ the trainer
def test_training_learns_and_logs(tmp_path) -> None:
    model = micro_model()
    stream = Stream()
    tr = make_trainer(model, tmp_path, steps=40, optim=OptimConfig(lr=2e-2, warmup_steps=4))
    log = StepLog.for_trainer(tr, seq_len=16, expert_load_every=10, progress=False)
    losses = []
    for _ in range(40):
        m = tr.step(lambda: language_model_loss(model, *stream(), mtp_weight=0.3))
        log.step(m)
        losses.append(m["loss"])
    log.close()
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    records = list(read_metrics(tmp_path, stage="pretrain"))
    assert len(records) == 40 and records[-1]["step"] == 40
    last = records[-1]
    for key in ("loss", "lm_loss", "mtp_loss", "lr", "grad_norm", "tok_per_s", "mfu", "expert_imbalance_max"):
        assert key in last, key
    assert set(last["expert_imbalance"]) == {"1", "mtp0"}
    loads = [r for r in records if "expert_load" in r]
    assert [r["step"] for r in loads] == [10, 20, 30, 40]
    assert len(loads[0]["expert_load"]["1"]) == 8


def test_tokens_per_second_is_the_steps_own(tmp_path) -> None:
    """tok/s and MFU measure a step, not the validation, probe or checkpoint the stage ran before it: the
    step after a validation logged a tenth of the throughput."""
    model = micro_model()
    stream = Stream()
    tr = make_trainer(model, tmp_path, steps=3)
    log = StepLog.for_trainer(tr, progress=False)
    log.step(tr.step(lambda: language_model_loss(model, *stream())))
    time.sleep(0.5)  # what a stage does between two steps: validate, save a checkpoint
    t0 = time.perf_counter()
    m = tr.step(lambda: language_model_loss(model, *stream()))
    took = time.perf_counter() - t0
    log.step(m)
    log.close()
    last = list(read_metrics(tmp_path, stage="pretrain"))[-1]
    assert last["step"] == 2 and "step_time_s" not in last
    assert last["tok_per_s"] >= m["step_tokens"] / took


def test_progress_bar_off_a_terminal_does_not_redraw_every_step(tmp_path, capsys) -> None:
    """In a CI log or a file each redraw is a line: tqdm's 0.1 s wrote one per step of a long run."""
    log = StepLog(tmp_path, "pretrain", 40, log_every=100)
    for step in range(1, 41):
        time.sleep(0.03)
        log.step(
            {"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "step_tokens": 8, "step_time_s": 0.03}
        )
    log.close()
    redraws = capsys.readouterr().err.count("\r")
    assert 0 < redraws <= 3  # the first draw and the last, not ~12


def test_progress_bar_off_a_terminal_is_not_redrawn_by_tqdms_monitor_between_redraws(monkeypatch) -> None:
    """Off a terminal a bar redraws every LOG_REDRAW_S (30 s); tqdm's monitor thread added a redraw
    maxinterval (10 s) after each, half the lines of a training log. Scaled down here: 0.6 s and 0.2 s."""
    import io

    from tqdm.auto import tqdm

    import nanoseek.metrics

    monkeypatch.setattr(nanoseek.metrics, "LOG_REDRAW_S", 0.6)
    monkeypatch.setattr(tqdm, "monitor_interval", 0.05)
    monkeypatch.setattr(tqdm, "monitor", None)  # one already running (an earlier bar's) sleeps 10 s
    out = io.StringIO()
    t0 = time.perf_counter()
    bar = nanoseek.metrics.progress_bar(total=40, file=out, maxinterval=0.2)
    try:
        for _ in range(40):
            time.sleep(0.06)
            bar.update(1)
        elapsed = time.perf_counter() - t0
        bar.close()
    finally:
        tqdm.monitor.exit()
    # the first draw, one per 0.6 s, the last
    assert out.getvalue().count("\r") <= 2 + int(elapsed / 0.6)


def test_progress_bar_in_a_notebook_cell_redraws_as_on_a_terminal() -> None:
    """A notebook's cell output (ipykernel's stream) is no tty, but its front end redraws a bar in
    place: throttled as a log, a training bar there moved once every 30 s."""
    import io

    import nanoseek.metrics

    cell = type("OutStream", (io.StringIO,), {"__module__": "ipykernel.iostream"})()
    bar = nanoseek.metrics.progress_bar(total=3, file=cell)
    try:
        assert bar.mininterval < 1
    finally:
        bar.close()
    log = nanoseek.metrics.progress_bar(total=3, file=io.StringIO())  # a log file still is throttled
    try:
        assert log.mininterval == nanoseek.metrics.LOG_REDRAW_S
    finally:
        log.close()


def test_gradient_accumulation_matches_big_batch(tmp_path) -> None:
    """Two micro-batches of 2 rows, each weighted 1/2 by the caller == one batch of 4 rows."""
    x, y = batch_at(0)
    a, b = micro_model(), micro_model()
    ta = make_trainer(a, tmp_path / "a", steps=1, bias_update_speed=0.0)
    tb = make_trainer(b, tmp_path / "b", steps=1, bias_update_speed=0.0)
    big = ta.step(lambda: language_model_loss(a, x, y), accumulation=1)
    halves = iter([(x[:2], y[:2]), (x[2:], y[2:])])

    def half() -> tuple[torch.Tensor, dict]:
        loss, m = language_model_loss(b, *next(halves))
        return loss / 2, m

    two = tb.step(half, accumulation=2)
    assert two["loss"] == pytest.approx(big["loss"], rel=1e-5)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_a_micro_batch_without_targets_adds_nothing(tmp_path) -> None:
    """A micro-batch whose targets are all masked (a window inside a long chat prompt) is its zero share
    of the step's mean, even where no balance loss carries a graph (a dense model, α = 0): it crashed
    backward ("does not require grad")."""
    x, y = batch_at(0)
    empty = (batch_at(1)[0], torch.full_like(y, -100))
    counts = target_counts(y, 1)

    def train(micro_batches) -> tuple[float, list[torch.Tensor]]:
        m = micro_model()
        tr = make_trainer(m, tmp_path / str(len(micro_batches)), steps=2)
        m.set_balance_alpha(0.0)
        step = StepTargets(counts, micro_batches=len(micro_batches))
        it = iter(micro_batches)
        loss = tr.step(lambda: language_model_loss(m, *next(it), 0.3, step=step), len(micro_batches))["loss"]
        return loss, [p.detach().clone() for p in m.parameters()]

    alone, with_empty = train([(x, y)]), train([(x, y), empty])
    assert with_empty[0] == alone[0]
    assert all(torch.equal(a, b) for a, b in zip(alone[1], with_empty[1], strict=True))


def test_nan_and_spike_steps_are_skipped(tmp_path, capsys) -> None:
    model = micro_model()
    stream = Stream()
    tr = make_trainer(model, tmp_path, steps=30, spike_warmup=5, spike_factor=3.0)
    log = StepLog.for_trainer(tr, progress=False)

    def ok():
        return language_model_loss(model, *stream())

    for _ in range(6):
        log.step(tr.step(ok))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss():
        loss, m = ok()
        return loss * float("nan"), m

    def spike():
        loss, m = ok()
        return loss * 10.0, m

    m1 = tr.step(nan_loss)
    log.step(m1)
    m2 = tr.step(spike)
    log.step(m2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a skipped step changed the model"
    assert "non-finite" in m1["skipped"] and "spike" in m2["skipped"]
    assert tr.skipped_steps == 2 and tr.global_step == 8
    assert "skipped" in capsys.readouterr().out
    logged = [r for r in read_metrics(tmp_path) if "skipped" in r]
    assert [r["step"] for r in logged] == [7, 8]
    m3 = tr.step(ok)
    assert "skipped" not in m3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_small_loss_rising_a_little_is_not_a_spike(tmp_path) -> None:
    """Near zero a ratio alone would skip the batches the model still gets wrong: 10x a mean of a few
    thousandths is kept, a jump by nats is not."""
    model = micro_model()
    stream = Stream()
    tr = make_trainer(model, tmp_path, steps=30, spike_warmup=5, spike_factor=3.0)

    def scaled(k: float):
        def fn():
            loss, m = language_model_loss(model, *stream())
            return loss * k, m

        return fn

    for _ in range(6):
        assert "skipped" not in tr.step(scaled(1e-3))
    assert "skipped" not in tr.step(scaled(1e-2))  # ~10x the mean, a few hundredths of a nat above it
    assert "spike" in tr.step(scaled(1.0))["skipped"]


def test_too_many_skips_raise(tmp_path) -> None:
    model = micro_model()
    tr = make_trainer(model, tmp_path, steps=10, max_consecutive_skips=2)
    bad = lambda: (torch.tensor(float("inf"), requires_grad=True), {})  # noqa: E731
    tr.step(bad)
    with pytest.raises(RuntimeError, match="diverged"):
        tr.step(bad)


def test_a_diverged_run_names_its_steps_and_the_checkpoint_kept(tmp_path) -> None:
    """The error named no step, and told the user to resume from the last checkpoint: a resume keeps the
    run's learning rate (a lower one is refused) and, exact, diverges again at the same step; before a
    first save there was no checkpoint of the run at all."""
    model = micro_model()
    bad = lambda: (torch.tensor(float("inf"), requires_grad=True), {})  # noqa: E731
    tr = make_trainer(model, tmp_path / "a", steps=10, max_consecutive_skips=2)
    tr.step(lambda: language_model_loss(model, *batch_at(0)))
    tr.step(bad)
    with pytest.raises(RuntimeError) as e:
        tr.step(bad)
    assert "(optimizer steps 2-3, last: non-finite loss); training diverged. Lower" in str(e.value)
    assert "resume from" not in str(e.value) and "checkpoint" not in str(e.value)  # nothing saved yet
    tr = make_trainer(micro_model(), tmp_path / "b", steps=10, max_consecutive_skips=2)
    tr.save()
    tr.step(bad)
    with pytest.raises(RuntimeError, match=r"diverged; the last checkpoint, in .*b[/\\]pretrain, is kept\."):
        tr.step(bad)


def test_weights_holding_nan_are_refused_before_training(tmp_path) -> None:
    """A model (--init) or a checkpoint (--resume) holding a NaN weight made every step's loss NaN: ten
    steps skipped, then "training diverged; lower the learning rate", of a run that never could train."""
    import re

    from safetensors.torch import load_file, save_file

    model = micro_model()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias[0] = float("inf")
    with pytest.raises(ValueError, match="model pretrain starts from holds NaN or inf in 1 weight tensor"):
        make_trainer(model, tmp_path / "a")
    tr = make_trainer(micro_model(), tmp_path / "b")
    weights = tr.save() / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("q_a_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"checkpoint .* holds NaN or inf .*{re.escape(name)}"):
        make_trainer(micro_model(), tmp_path / "b").resume()


def test_balancing_bias_moves_load_toward_uniform(tmp_path) -> None:
    """Start with a bias that sends most tokens to experts 0-1; γ>0 pulls the load back, γ=0 does not."""

    def run(gamma: float) -> tuple[list[float], torch.Tensor]:
        model = micro_model()
        router = model.model.layers[1].mlp.gate
        router.e_score_correction_bias[:2] = 0.5
        stream = Stream()
        # lr so small the weights barely move: only the bias changes routing
        tr = make_trainer(
            model,
            tmp_path / str(gamma),
            steps=60,
            bias_update_speed=gamma,
            optim=OptimConfig(lr=1e-6, warmup_steps=0, schedule="constant"),
        )
        imb = [
            tr.step(lambda: language_model_loss(model, *stream()))["expert_imbalance"]["1"] for _ in range(60)
        ]
        return imb, router.e_score_correction_bias.clone()

    balanced, bias = run(0.02)
    fixed, bias0 = run(0.0)
    assert fixed[0] == pytest.approx(balanced[0])
    assert sum(fixed[-10:]) / 10 > 3.0
    assert sum(balanced[-10:]) / 10 < 0.6 * sum(fixed[-10:]) / 10
    assert bias[:2].max() < 0.5 and torch.equal(bias0[:2], torch.full((2,), 0.5))


# ------------------------------------------------------- checkpoints/resume
def _run(model, tmp_path, steps_total, steps_now, resume=False, save_at=None, optimizer="adamw"):
    stream = Stream()
    optim = OptimConfig(lr=1e-2, warmup_steps=3, optimizer=optimizer)
    tr = make_trainer(model, tmp_path, steps=steps_total, optim=optim)
    if resume:
        stream.load_state_dict(tr.resume())
    losses = []
    while tr.global_step < steps_now:
        losses.append(tr.step(lambda: language_model_loss(model, *stream(), mtp_weight=0.3))["loss"])
        if save_at and tr.global_step == save_at:
            tr.save(stream.state_dict())
    return losses, tr


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bitwise_exact_in_fp32(tmp_path, optimizer) -> None:
    straight, _ = _run(micro_model(), tmp_path / "a", 8, 8, optimizer=optimizer)
    first, _ = _run(micro_model(), tmp_path / "b", 8, 4, save_at=4, optimizer=optimizer)
    # a fresh process would build the model from scratch: different init seed proves weights are loaded
    second, tr = _run(micro_model(seed=123), tmp_path / "b", 8, 8, resume=True, optimizer=optimizer)
    assert tr.global_step == 8
    assert first + second == straight  # bitwise: == on Python floats


def test_checkpoint_layout_and_loadable(tmp_path) -> None:
    model = micro_model()
    _, tr = _run(model, tmp_path, 3, 3, save_at=3)
    ckpt = tmp_path / "pretrain"
    assert {"config.json", "model.safetensors", "generation_config.json", "train_state"} <= {
        p.name for p in ckpt.iterdir()
    }
    meta = json.loads((ckpt / "train_state" / "trainer.json").read_text())
    assert meta["step"] == 3 and meta["stage"] == "pretrain"
    loaded = load_model(ckpt)
    for k, v in model.state_dict().items():
        if k in loaded.state_dict():
            assert torch.equal(v, loaded.state_dict()[k]), k


def test_checkpoint_keeps_every_stop_id_of_its_tokenizer(tmp_path) -> None:
    """A checkpoint whose generation_config.json lists several eos ids (Qwen2.5-Instruct: <|im_end|> and
    <|endoftext|>) still stops at all of them once trained."""
    from nanoseek.tokenizer import load_tokenizer
    from serve_fakes import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.save(tmp_path / "init")
    extra = tok.pad_token_id
    (tmp_path / "init" / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": [tok.eos_token_id, extra], "do_sample": True, "temperature": 0.7, "top_p": 0.8}
        )
    )
    tok = load_tokenizer(tmp_path / "init")
    assert tok.stop_token_ids == (tok.eos_token_id, extra)
    model = micro_model()
    make_trainer(model, tmp_path, steps=1, tokenizer=tok).save()
    gen = json.loads((tmp_path / "pretrain" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, extra]
    # the sampling defaults it shipped with stay (serve and transformers' generate read them)
    assert gen["do_sample"] is True and gen["temperature"] == 0.7 and gen["top_p"] == 0.8
    assert load_tokenizer(tmp_path / "pretrain").stop_token_ids == tok.stop_token_ids


def test_checkpoint_samples_as_the_one_it_started_from(tmp_path) -> None:
    """A generation_config.json that names a temperature without do_sample is read as sampling with it
    (serve, generate, chat): the trained checkpoint's file added do_sample false, and it was served
    greedily. One that names no sampling setting is written greedy."""
    from nanoseek.engine.sampling import generation_defaults
    from nanoseek.tokenizer import load_tokenizer
    from serve_fakes import tiny_tokenizer

    for shipped in ({"temperature": 0.6, "top_p": 0.95}, {}):
        tiny_tokenizer().save(tmp_path / "init")
        (tmp_path / "init" / "generation_config.json").write_text(json.dumps(shipped))
        tok = load_tokenizer(tmp_path / "init")
        make_trainer(micro_model(), tmp_path, steps=1, tokenizer=tok).save()
        saved = load_tokenizer(tmp_path / "pretrain").generation_config
        assert generation_defaults(saved) == (generation_defaults(shipped) or {"temperature": 0.0})


def _saved_at_step_2(tmp_path, **kw) -> dict[str, bytes]:
    """A run of 4 steps checkpointed at step 2; the bytes of its train_state files."""
    model, stream = micro_model(), Stream()
    tr = make_trainer(model, tmp_path, steps=4, **kw)
    for _ in range(2):
        tr.step(lambda: language_model_loss(model, *stream()))
    tr.save(stream.state_dict())
    return {p.name: p.read_bytes() for p in (tmp_path / "pretrain" / "train_state").iterdir()}


@pytest.mark.parametrize(
    ("changed", "message"),
    [
        (
            dict(optim=OptimConfig(lr=1e-2, warmup_steps=2, optimizer="muon")),
            "--optimizer: 'adamw' -> 'muon'",
        ),
        (dict(optim=OptimConfig(lr=3e-2, warmup_steps=2)), "--lr: 0.01 -> 0.03"),
        (dict(bias_update_speed=0.01), "--bias-update-speed: 0.001 -> 0.01"),
        (dict(resume_settings={"batch_size": 8, "mask_prompts": True}), "--batch-size: 4 -> 8"),
        (dict(resume_settings={"batch_size": 4, "mask_prompts": False}), "--prompt-loss: left out -> given"),
    ],
)
def test_resume_refuses_changed_settings_and_writes_nothing(tmp_path, changed, message) -> None:
    """An exact resume needs the settings the checkpoint was trained with: another optimizer would
    take over AdamW's state (and save its own over it), another batch would train another run."""
    settings = {"batch_size": 4, "mask_prompts": True}
    saved = _saved_at_step_2(tmp_path, resume_settings=settings, flags_from=PretrainConfig)
    kw = {"resume_settings": settings, "flags_from": PretrainConfig, **changed}
    other = make_trainer(micro_model(seed=5), tmp_path, steps=4, **kw)
    with pytest.raises(ValueError, match="cannot resume") as e:
        other.resume()
    assert message in str(e.value) and other.global_step == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "pretrain" / "train_state").iterdir()} == saved
    assert not [r for r in read_metrics(tmp_path) if r.get("event") == "resume"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda ts: (ts / "trainer.pt").write_bytes(b"PK\x03\x04"), r"trainer\.pt is truncated or damaged"),
        (lambda ts: (ts / "optimizer.pt").write_bytes(b""), r"optimizer\.pt is .*damaged: \(0 bytes"),
        (lambda ts: (ts / "optimizer.pt").unlink(), "lacks optimizer.pt"),
        (lambda ts: shutil.rmtree(ts), "holds weights but no train_state"),
        (lambda ts: (ts / "trainer.json").write_text('{"step": 2'), r"trainer\.json is not valid JSON"),
    ],
    ids=["truncated", "empty", "missing", "no-train-state", "trainer-json"],
)
def test_resume_of_a_damaged_train_state_is_refused_naming_the_file(tmp_path, damage, message) -> None:
    """A truncated or missing train state file (a partial copy, a hand clean-up): the resume raised
    torch's zip-reader error (or a bare JSON one), or, with train_state/ gone, started over and
    replaced the checkpoint at its first save."""
    _saved_at_step_2(tmp_path)
    ckpt = tmp_path / "pretrain"
    damage(ckpt / "train_state")
    weights = (ckpt / "model.safetensors").read_bytes()
    other = make_trainer(micro_model(seed=5), tmp_path, steps=4)
    with pytest.raises(ValueError, match=message):
        other.resume()
    assert other.global_step == 0 and (ckpt / "model.safetensors").read_bytes() == weights


def test_resume_may_run_longer_and_logs_where_it_resumed(tmp_path) -> None:
    """More steps (with the warmup a stage derives from them) is the one change a resume allows."""
    _saved_at_step_2(tmp_path, resume_settings={"batch_size": 4})
    longer = make_trainer(
        micro_model(seed=5),
        tmp_path,
        steps=40,
        optim=OptimConfig(lr=1e-2, warmup_steps=20),
        resume_settings={"batch_size": 4},
    )
    assert longer.resume() == {"pos": 2} and longer.global_step == 2
    (rec,) = [r for r in read_metrics(tmp_path, "pretrain") if r.get("event") == "resume"]
    assert rec["from_step"] == 2


@pytest.mark.parametrize("recorded", [None, {"batch_size": 4}])
def test_resume_of_an_older_checkpoint_checks_its_stage_config(tmp_path, recorded) -> None:
    """A checkpoint from before `resume_settings` (or before a setting joined them) holds the stage's
    config beside them: a resume that leaves out its --no-document-mask is refused too (it went on
    with the mask switched on), one with its flags goes on (its config's resolved precision aside)."""
    config = {"batch_size": 4, "document_mask": False, "precision": "bf16"}
    _saved_at_step_2(tmp_path, resume_settings={"batch_size": 4}, config_extra={"pretrain": config})
    meta_file = tmp_path / "pretrain" / "train_state" / "trainer.json"
    meta = json.loads(meta_file.read_text())
    if recorded is None:
        del meta["resume_settings"]
    meta_file.write_text(json.dumps(meta))

    def resume(document_mask: bool) -> Trainer:
        settings = {"batch_size": 4, "document_mask": document_mask, "precision": "auto"}
        tr = make_trainer(
            micro_model(seed=5),
            tmp_path,
            steps=4,
            resume_settings=settings,
            flags_from=PretrainConfig,
            config_extra={"pretrain": {**config, **settings, "precision": "fp32"}},
        )
        tr.resume()
        return tr

    with pytest.raises(ValueError, match=r"--no-document-mask: given -> left out"):
        resume(document_mask=True)
    assert resume(document_mask=False).global_step == 2


class ExplodingTokenizer:
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def save(self, directory):
        (directory / "tokenizer.json").write_text('{"half": ')  # a torn write...
        raise OSError("disk full")  # ...then the failure


def test_failed_checkpoint_write_keeps_previous(tmp_path) -> None:
    model = micro_model()
    stream = Stream()
    tr = make_trainer(model, tmp_path, steps=6)
    for _ in range(2):
        tr.step(lambda: language_model_loss(model, *stream()))
    tr.save(stream.state_dict())
    good = (tmp_path / "pretrain" / "model.safetensors").read_bytes()
    for _ in range(2):
        tr.step(lambda: language_model_loss(model, *stream()))
    tr.tokenizer = ExplodingTokenizer()
    with pytest.raises(OSError, match="disk full"):
        tr.save(stream.state_dict())
    ckpt = tmp_path / "pretrain"
    assert (ckpt / "model.safetensors").read_bytes() == good
    assert not (ckpt / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pretrain")] == []
    # and resuming picks up the intact step-2 checkpoint
    fresh = make_trainer(micro_model(seed=5), tmp_path, steps=6)
    assert fresh.resume() == {"pos": 2} and fresh.global_step == 2


def test_a_checkpoint_the_run_directory_refuses_is_written_elsewhere_and_resumes(
    tmp_path, monkeypatch
) -> None:
    """A run directory gone read-only (or full) by the end of a run lost every step trained: the save
    failed and the process ended with the weights. The checkpoint goes to the temporary directory
    instead, named in the error, and resumes from there."""
    import errno
    import os
    import re
    import tempfile

    import nanoseek.atomic

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model = micro_model()
    stream = Stream()
    tr = make_trainer(model, tmp_path / "run", steps=6)
    for _ in range(2):
        tr.step(lambda: language_model_loss(model, *stream()))

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    with monkeypatch.context() as m:
        m.setattr(nanoseek.atomic, "atomic_directory", read_only)
        with pytest.raises(
            OSError, match="Read-only file system; the checkpoint of step 2 was written to"
        ) as e:
            tr.save(stream.state_dict())
    assert e.value.filename == str(tmp_path / "run" / "pretrain")
    rescue = re.search(r"written to (\S+) instead", str(e.value)).group(1)
    shutil.copytree(rescue, tmp_path / "elsewhere" / "pretrain")
    fresh = make_trainer(micro_model(seed=5), tmp_path / "elsewhere", steps=6)
    assert fresh.resume() == {"pos": 2} and fresh.global_step == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), model.parameters(), strict=True))


def test_a_metrics_write_refused_mid_run_keeps_the_weights_trained(tmp_path, monkeypatch) -> None:
    """metrics.jsonl refused mid-run (the disk went read-only or full) ended the run at that step's record,
    with no checkpoint of the steps trained since the last save: their weights go to the temporary
    directory, named in the error."""
    import errno
    import os
    import re
    import tempfile

    import nanoseek.metrics

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model = micro_model()
    stream = Stream()
    tr = make_trainer(model, tmp_path / "run", steps=6)
    log = StepLog.for_trainer(tr, progress=False)
    appended = nanoseek.metrics.append_records

    def full_from_step_3(path, records):
        if any(r.get("step") == 3 for r in records):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        appended(path, records)

    monkeypatch.setattr(nanoseek.metrics, "append_records", full_from_step_3)
    expected = "No space left on device; the weights of step 3 were written to"
    with pytest.raises(OSError, match=expected) as e, tr.stop_on_signals():
        while not tr.done:
            log.step(tr.step(lambda: language_model_loss(model, *stream())))
    assert e.value.filename == str(tmp_path / "run" / "metrics.jsonl")
    rescue = re.search(r"written to (\S+) instead", str(e.value)).group(1)
    saved = load_model(rescue)
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), model.parameters(), strict=True))


def test_a_tensorboard_write_refused_mid_run_names_its_directory_and_keeps_the_weights(
    tmp_path, monkeypatch
) -> None:
    """TensorBoard's writer thread met the full disk and its next call raised that ENOSPC, which named no
    file: the run ended with "No space left on device" alone, the steps trained since the last save lost
    with the process; and the stage's closing of its log raised it again over any error that said more."""
    import errno
    import os
    import re
    import tempfile
    import threading

    pytest.importorskip("tensorboard")
    from tensorboard.compat.tensorflow_stub.io import gfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    model = micro_model()
    stream = Stream()
    tr = make_trainer(model, tmp_path / "run", steps=6)
    printed: list = []  # what threading printed: the thread's traceback, above the stage's error
    monkeypatch.setattr(threading, "excepthook", printed.append)
    log = StepLog.for_trainer(tr, progress=False, tensorboard=True)

    def full(self, filename, file_content, binary_mode=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as io.open's write reports it: no file

    monkeypatch.setattr(gfile.LocalFileSystem, "append", full)
    monkeypatch.setattr(gfile.LocalFileSystem, "write", full)
    with pytest.raises(OSError, match="No space left on device; the weights of step") as e:
        try:  # as the stages run their steps and close their log
            with tr.stop_on_signals():
                while not tr.done:
                    log.step(tr.step(lambda: language_model_loss(model, *stream())))
                log.close()  # (the thread's error may come only here, after the last step)
        except BaseException:
            log.close()
            raise
    assert e.value.filename == str(tmp_path / "run" / "tensorboard" / "pretrain") and printed == []
    rescue = re.search(r"written to (\S+) instead", str(e.value)).group(1)
    saved = load_model(rescue)
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), model.parameters(), strict=True))


def test_weights_an_update_made_non_finite_are_not_saved_over_the_last_checkpoint(tmp_path) -> None:
    """A learning rate too large for fp32 passes the guard (the step's loss and gradient are finite) and
    writes inf/NaN into the weights: the checkpoints that followed were saved with them, silently, over
    the last good one that the divergence error tells the user to resume from."""
    model = micro_model()
    stream = Stream()
    tr = make_trainer(model, tmp_path, steps=6, optim=OptimConfig(lr=1e39, warmup_steps=0))
    tr.save(stream.state_dict())
    good = (tmp_path / "pretrain" / "model.safetensors").read_bytes()
    assert "skipped" not in tr.step(lambda: language_model_loss(model, *stream()))
    with pytest.raises(RuntimeError, match="NaN or inf.*not overwritten"):
        tr.save(stream.state_dict())
    assert (tmp_path / "pretrain" / "model.safetensors").read_bytes() == good


def test_a_diverged_run_ends_the_command_with_one_line(monkeypatch, capsys) -> None:
    """A run that diverged is an outcome, not a bug: its message (what to do) in one line, exit status 1,
    not a traceback with the message at its end."""
    from nanoseek.cli import main
    from nanoseek.train import TrainingDiverged

    def diverging(args):
        raise TrainingDiverged("pretrain step 2: training diverged. Lower the learning rate.")

    monkeypatch.setattr("nanoseek.commands.report.run", diverging)
    monkeypatch.setattr("nanoseek.cli.importlib.import_module", __import__("importlib").import_module)
    assert main(["report", "somewhere"]) == 1
    err = capsys.readouterr().err
    assert (
        err.strip() == "nanoseek report: error: pretrain step 2: training diverged. Lower the learning rate."
    )


def test_bf16_autocast_trains(tmp_path) -> None:
    model = micro_model()
    stream = Stream()
    tr = Trainer(model, tmp_path, "pretrain", OptimConfig(), total_steps=5, precision="bf16")
    losses = [
        tr.step(lambda: language_model_loss(model, *stream(), mtp_weight=0.3))["loss"] for _ in range(5)
    ]
    assert all(math.isfinite(v) for v in losses)
    assert model.lm_head.weight.dtype == torch.float32  # master weights stay fp32


def test_a_model_in_16_bits_is_refused_its_master_weights_would_be(tmp_path) -> None:
    """A model loaded in bf16 (`load_model(dtype="auto")` on a CPU with native bf16) trained with bf16
    weights and AdamW moments whatever `precision` said: at lr 1e-5 most of a layer's weights never
    moved, their updates rounded away, and the checkpoint was saved in bf16."""
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match=rf"weights in {dtype}: .* float32"):
            make_trainer(micro_model().to(dtype), tmp_path, precision="bf16")
    assert not (tmp_path / "pretrain").exists()


def test_bf16_on_a_cpu_without_native_bf16_is_said(tmp_path, monkeypatch, capsys) -> None:
    """`--precision bf16` on an AVX2 CPU trained ~20x slower than fp32 without a word of why."""
    import nanoseek.perf

    native = {"value": False}
    monkeypatch.setattr(nanoseek.perf, "cpu_has_bf16", lambda: native["value"])
    make_trainer(micro_model(), tmp_path, precision="bf16")
    err = capsys.readouterr().err
    assert "pretrain trains in bf16 on a CPU without native bf16" in err and "fp32 is the fast path" in err
    make_trainer(micro_model(), tmp_path, precision="fp32")
    native["value"] = True
    make_trainer(micro_model(), tmp_path, precision="bf16")
    assert "native bf16" not in capsys.readouterr().err


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="precision"):
        make_trainer(micro_model(), tmp_path, precision="fp16")
    with pytest.raises(ValueError, match="total_steps"):
        make_trainer(micro_model(), tmp_path, steps=0)
    # a NaN γ (Python callers skip the flags' checks) made every router's selection bias NaN at the first
    # step, and training went on with the routing broken
    for gamma in (-0.001, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="bias_update_speed"):
            make_trainer(micro_model(), tmp_path, bias_update_speed=gamma)


def test_a_stage_without_a_process_group_refuses_torchrun(tmp_path, monkeypatch) -> None:
    """`torchrun -m nanoseek sft` ran one whole SFT per process, all writing the same checkpoint."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="trains in one process, but torchrun started 2"):
        make_trainer(micro_model(), tmp_path)
    assert not (tmp_path / "pretrain").exists()


def test_fp8_precision_converts_and_trains(tmp_path) -> None:
    fp8 = pytest.importorskip("nanoseek.model.fp8")
    model = micro_model()
    stream = Stream()
    tr = Trainer(model, tmp_path, "pretrain", OptimConfig(), total_steps=2, precision="fp8")
    assert any(isinstance(m, fp8.FP8TrainingLinear) for m in model.modules())
    for _ in range(2):
        assert math.isfinite(tr.step(lambda: language_model_loss(model, *stream()))["loss"])


@pytest.mark.slow  # a fresh Python process importing torch: ~5 s alone, much more on a loaded machine
def test_kill_mid_checkpoint_keeps_previous(tmp_path) -> None:
    """SIGKILL a process while it writes its second checkpoint: the first stays whole and resumable."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    child = f"""
import sys, time, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
torch.set_num_threads(1)
import nanoseek.checkpoint as ck
from test_train_loop import Stream, make_trainer, micro_model
from nanoseek.train.loop import language_model_loss
model, stream = micro_model(), Stream()
tr = make_trainer(model, {str(tmp_path)!r}, steps=4)
tr.step(lambda: language_model_loss(model, *stream()))
tr.save(stream.state_dict())
real = ck.save_model
def slow(*a, **k):
    real(*a, **k)
    print("WRITING", flush=True)
    time.sleep(120)
ck.save_model = slow
tr.step(lambda: language_model_loss(model, *stream()))
tr.save(stream.state_dict())
"""
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    assert [p.name.startswith(".pretrain.tmp-") for p in tmp_path.iterdir()].count(True) == 1
    meta = json.loads((tmp_path / "pretrain" / "train_state" / "trainer.json").read_text())
    assert meta["step"] == 1
    tr = make_trainer(micro_model(seed=3), tmp_path, steps=4)
    assert tr.resume() == {"pos": 1} and tr.global_step == 1
    tr.save({"pos": 1})  # the next write clears the dead one's scratch directory
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pretrain.tmp-")]


def test_optimizer_step_is_visible_to_an_engine_sharing_the_model(tmp_path) -> None:
    """Fused AdamW writes weights without bumping version counters; the Trainer bumps them, or an
    Engine rolling out with this model (GRPO) would keep sampling from stale derived weights."""
    from nanoseek.engine import Engine, SamplingParams

    model = micro_model(mtp=0)
    tr = make_trainer(model, tmp_path, optim=OptimConfig(lr=0.5, warmup_steps=0))
    engine = Engine(model, max_batch_size=2)
    prompt = [[1, 2, 3, 4]]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine.generate(prompt, params)
    before = [p._version for p in model.parameters()]
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    tr.step(lambda: language_model_loss(model, ids[:, :-1], ids[:, 1:]))
    assert all(p._version > v for p, v in zip(model.parameters(), before, strict=True) if p.requires_grad)
    got = engine.generate(prompt, params)[0]
    with torch.no_grad():  # greedy decoding by full recomputation with the updated weights
        seq = list(prompt[0])
        for _ in range(6):
            seq.append(int(model.eval()(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[4:]


def test_peak_is_measured_again_when_a_step_beats_it(tmp_path, monkeypatch) -> None:
    """A peak measured while the machine was busy must not turn MFU into 160%."""
    from nanoseek import perf

    readings = iter([50.0, 400.0])
    fake = lambda *a, **k: next(readings)  # noqa: E731
    fake.cache_clear = lambda: None
    monkeypatch.setattr(perf, "matmul_peak_flops", fake)
    log = StepLog.for_trainer(make_trainer(micro_model(), tmp_path), seq_len=16, progress=False)
    assert log._peak_flops() == 50.0
    assert log._peak_flops(achieved=80.0) == 400.0  # re-measured, the higher reading kept
    assert log._peak_flops(achieved=100.0) == 400.0  # below the peak: no new measurement


def test_peak_is_measured_again_at_another_thread_count(tmp_path, monkeypatch) -> None:
    """The speedrun's teacher pretrains on half the CPU threads, then takes back the student's: its MFU
    went on against the half's peak, up to twice the true figure."""
    from nanoseek import perf

    readings, threads = iter([50.0, 100.0, 60.0]), [1]
    fake = lambda *a, **k: next(readings)  # noqa: E731
    fake.cache_clear = lambda: None
    monkeypatch.setattr(perf, "matmul_peak_flops", fake)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[0])
    log = StepLog.for_trainer(make_trainer(micro_model(), tmp_path), seq_len=16, progress=False)
    assert log._peak_flops() == 50.0
    assert log._peak_flops() == 50.0  # same threads: no new measurement
    threads[0] = 2
    assert log._peak_flops() == 100.0
    threads[0] = 1
    assert log._peak_flops() == 60.0  # the fewer threads' own peak, not the higher one kept


def test_mfu_is_the_steps_flops_over_the_peak_of_all_ranks_and_stays_a_fraction(
    tmp_path, monkeypatch
) -> None:
    """tok/s x FLOPs per token over the measured matmul peak of every rank (the tokens are all ranks')."""
    from nanoseek import perf

    dtypes = []
    fake = lambda dtype, device: dtypes.append(dtype) or 100.0  # noqa: E731  # FLOP/s per device
    fake.cache_clear = lambda: None
    monkeypatch.setattr(perf, "matmul_peak_flops", fake)
    log = StepLog.for_trainer(make_trainer(micro_model(), tmp_path), seq_len=16, progress=False)
    log.flops_per_token, log.world_size, log.precision = 10.0, 2, "bf16"
    m = {"step_tokens": 5, "step_time_s": 0.5}
    log._throughput(m)
    assert m == {"tok_per_s": 10.0, "mfu": 0.5}  # 10 tok/s x 10 FLOPs over 2 x 100 FLOP/s
    m = {"step_tokens": 30, "step_time_s": 1.0}  # beats the peak measured: a fraction still
    log._throughput(m)
    assert m == {"tok_per_s": 30.0, "mfu": 1.0}
    assert dtypes == [torch.bfloat16] * 2  # the peak of the precision it trains in


def test_a_deadline_refits_the_schedule_and_stops(tmp_path, monkeypatch) -> None:
    """A time-budgeted stage anneals by its deadline: the step count follows the measured pace."""
    import nanoseek.train.loop as loop

    model = micro_model(mtp=0)
    stream = Stream()
    tr = make_trainer(model, tmp_path, steps=100, deadline=40.0)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: 2.0 * tr.global_step)  # 2 "seconds" a step
    while not tr.done:
        tr.step(lambda: language_model_loss(model, *stream()))
    assert tr.total_steps < 100  # refit to the pace: about 20 steps fit in 40 seconds
    assert 15 <= tr.global_step <= 21
    assert tr.lr_at(tr.total_steps) == pytest.approx(tr.optim_config.lr * tr.optim_config.min_lr_ratio)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_save_before_the_first_update_changes_nothing(tmp_path, optimizer) -> None:
    """torch's optimizer state-dict helper initializes an empty optimizer with a zero-gradient step;
    a checkpoint written before the first update (GRPO's no-signal steps, skipped steps) must neither
    count that step in the run that wrote it nor in a run resumed from it."""
    optim = OptimConfig(lr=1e-2, warmup_steps=0, optimizer=optimizer)

    def train(tr, model) -> list[float]:
        return [tr.step(lambda i=i: language_model_loss(model, *batch_at(i)))["loss"] for i in range(3)]

    m = micro_model()
    straight = train(make_trainer(m, tmp_path / "a", steps=3, optim=optim), m)
    m = micro_model()
    tr = make_trainer(m, tmp_path / "b", steps=3, optim=optim)
    tr.save()
    assert not tr.optimizer.state
    assert train(tr, m) == straight
    m = micro_model()
    make_trainer(m, tmp_path / "c", steps=3, optim=optim).save()
    m = micro_model(seed=7)
    tr = make_trainer(m, tmp_path / "c", steps=3, optim=optim)
    tr.resume()
    assert train(tr, m) == straight


def test_resume_restores_the_torch_and_python_rng(tmp_path) -> None:
    """A step that draws from torch's and Python's global RNG (GRPO's sampling, dropout, shuffles)
    continues bit-exactly after a resume in a process whose RNG is elsewhere."""

    def noisy(model):
        def fn():
            loss, m = language_model_loss(model, *batch_at(random.randrange(100)))
            return loss * (1 + torch.rand(())), m

        return fn

    def run(d, steps_now, save_at=None, resume=False, seed=0):
        model = micro_model(seed=seed)
        tr = make_trainer(model, d, steps=6)
        torch.manual_seed(seed)
        random.seed(seed)
        if resume:
            tr.resume()
        losses = []
        while tr.global_step < steps_now:
            losses.append(tr.step(noisy(model))["loss"])
            if tr.global_step == save_at:
                tr.save()
        return losses

    straight = run(tmp_path / "a", 6)
    first = run(tmp_path / "b", 3, save_at=3)
    assert first + run(tmp_path / "b", 6, resume=True, seed=1) == straight


def test_resume_restores_the_guard_and_the_counters(tmp_path) -> None:
    """The spike guard's running mean and warmup count, the consecutive skips and the tokens and skips
    counted go on from the checkpoint: a resumed run skips, and stops, where the straight run does."""

    def steps(tr, model, start, stop=6):
        good = lambda i: lambda: language_model_loss(model, *batch_at(i))  # noqa: E731
        inf = lambda: (torch.tensor(float("inf"), requires_grad=True), {})  # noqa: E731

        def spike():
            loss, m = language_model_loss(model, *batch_at(9))
            return loss * 100, m

        plan = [good(0), good(1), good(2), inf, spike, inf]  # skips at steps 3, 4, 5: the third stops it
        out = []
        for i in range(start, stop):
            if i == 4 and start == 0:
                tr.save()
            out.append(tr.step(plan[i]))
        return out

    def trainer(d, seed=0):
        model = micro_model(seed=seed)
        tr = make_trainer(model, d, steps=10, spike_warmup=2, max_consecutive_skips=3)
        return tr, model

    tr, model = trainer(tmp_path / "a")
    with pytest.raises(RuntimeError, match="3 consecutive steps skipped"):
        steps(tr, model, 0)
    straight = (tr.global_step, tr.skipped_steps, tr.tokens_seen)
    tr, model = trainer(tmp_path / "a", seed=5)
    tr.resume()
    assert "spike" in steps(tr, model, 4, 5)[0]["skipped"]
    with pytest.raises(RuntimeError, match="3 consecutive steps skipped"):
        steps(tr, model, 5)
    assert (tr.global_step, tr.skipped_steps, tr.tokens_seen) == straight


def test_resume_into_a_model_the_checkpoint_does_not_fill_is_refused(tmp_path) -> None:
    """The optimizer-state loader is not strict (an unused MTP layer has no state), so the key check
    is what keeps a resume from leaving weights the checkpoint lacks (here: the MTP layer) as they were."""
    _run(micro_model(mtp=0), tmp_path, 4, 2, save_at=2)
    with pytest.raises(ValueError, match=r"missing \['model\.mtp_layers\.0\."):
        make_trainer(
            micro_model(mtp=1), tmp_path, steps=4, optim=OptimConfig(lr=1e-2, warmup_steps=3)
        ).resume()


def test_no_checkpoint_is_due_at_the_last_step(tmp_path) -> None:
    """Every `checkpoint_every` steps but the last, which the stage saves anyway (no second full write)."""
    model = micro_model(mtp=0)
    tr = make_trainer(model, tmp_path, steps=4, checkpoint_every=2)
    due = []
    for i in range(4):
        tr.step(lambda i=i: language_model_loss(model, *batch_at(i)))
        due.append(tr.checkpoint_due())
    assert due == [False, True, False, False]


def test_gradients_are_clipped_to_grad_clip_and_the_norm_before_is_returned(tmp_path) -> None:
    """Every gradient scaled so their global norm is grad_clip; the norm measured before clipping is the
    one logged (and guarded); grad_clip 0 leaves the gradients as they are."""
    for clip, expected_after in ((0.5, 0.5), (0.0, None)):
        model = micro_model()
        tr = make_trainer(model, tmp_path / str(clip), optim=OptimConfig(grad_clip=clip))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.ones_like(p)
        before = math.sqrt(sum(p.numel() for p in params))  # the norm of all-ones gradients
        assert tr._clip_grads() == pytest.approx(before)
        after = torch.cat([p.grad.flatten() for p in params]).norm().item()
        assert after == pytest.approx(expected_after or before, rel=1e-4)  # torch adds 1e-6 to the norm


def test_balancing_bias_moves_each_expert_by_gamma_against_its_load(tmp_path) -> None:
    """V3 §2.1.2 by hand: b_i += γ·sign(mean load − load_i), so an overloaded expert's bias falls by γ, an
    underloaded one's rises by γ, one at the mean stays; a router that routed nothing is left alone."""
    model = micro_model()
    tr = make_trainer(model, tmp_path, bias_update_speed=0.01)
    (name, router), *_ = model.routers()
    load = torch.tensor([9.0, 1.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0])  # mean 2
    tr._update_bias({name: load})
    expected = [-0.01, 0.01, 0.0, 0.0, 0.0, 0.01, 0.01, 0.01]
    assert router.e_score_correction_bias.tolist() == pytest.approx(expected)
    tr._update_bias({name: torch.zeros(8)})
    assert router.e_score_correction_bias.tolist() == pytest.approx(expected)


def test_a_ranks_share_of_the_step_mean_is_scaled_up_by_the_world_size() -> None:
    """Data parallelism averages the ranks' gradients, so a rank holding a quarter of a 2-rank step's
    targets weighs its mean by 2 x 1/4: the average over ranks is then the mean over every target."""
    model = micro_model()
    x, y = batch_at(0)
    plain, _ = language_model_loss(model, x, y)
    n = float((y != -100).sum())
    loss, _ = language_model_loss(model, x, y, step=StepTargets(torch.tensor([4 * n, 4 * n]), world_size=2))
    assert loss.item() == pytest.approx(plain.item() * 0.5, rel=1e-6)


def test_step_metrics_are_averaged_over_the_micro_batches(tmp_path) -> None:
    """The loss is the micro-batches' sum (each weighted by its caller), the other metrics their mean, the
    tokens their sum."""
    model = micro_model()
    tr = make_trainer(model, tmp_path)
    values = iter([1.0, 3.0])

    def loss_fn():
        loss, _ = language_model_loss(model, *batch_at(0))
        return loss, {"lm_loss": next(values), "tokens": 64}

    plain, _ = language_model_loss(model, *batch_at(0))
    metrics = tr.step(loss_fn, accumulation=2)
    assert metrics["lm_loss"] == pytest.approx(2.0) and metrics["step_tokens"] == 128
    assert metrics["loss"] == pytest.approx(2 * plain.item(), rel=1e-5)


def test_each_step_trains_at_its_own_scheduled_lr(tmp_path) -> None:
    """Step s (0-based) runs at lr·lr_multiplier(s): the first at lr/warmup, not the second's."""
    model = micro_model()
    tr = make_trainer(model, tmp_path, optim=OptimConfig(lr=1e-2, warmup_steps=4))
    for s in range(3):
        metrics = tr.step(lambda s=s: language_model_loss(model, *batch_at(s)))
        assert metrics["lr"] == pytest.approx(1e-2 * (s + 1) / 4)
        assert {g["lr"] for g in tr.optimizer.param_groups} == {metrics["lr"]}


def test_the_logged_lm_loss_of_a_step_is_the_mean_over_all_its_targets(tmp_path) -> None:
    """With `StepTargets`, each micro-batch's lm_loss metric is logged as its share times the
    micro-batches, so the Trainer's average over them is the step's mean over every target: what one
    batch of all the rows logs (torchtitan / nanochat's token-weighted accumulation)."""
    model = micro_model()
    tr = make_trainer(model, tmp_path, bias_update_speed=0.0)
    x, y = batch_at(0)
    y = y.clone()
    y[2:, :12] = -100  # the second micro-batch holds a quarter of the first one's targets
    with torch.no_grad():
        _, whole = language_model_loss(model, x, y)
    step = StepTargets(target_counts(y, 1), micro_batches=2)
    halves = iter([(x[:2], y[:2]), (x[2:], y[2:])])
    metrics = tr.step(lambda: language_model_loss(model, *next(halves), step=step), accumulation=2)
    assert metrics["lm_loss"] == pytest.approx(whole["lm_loss"].item(), rel=1e-5)
    assert metrics["step_tokens"] == x.numel() and metrics["tokens"] == x.numel()


def test_tokens_count_up_over_the_steps(tmp_path) -> None:
    """`tokens` is the run's total so far, `step_tokens` the step's own (the micro-batches' sum)."""
    model = micro_model()
    tr = make_trainer(model, tmp_path)
    seen = [tr.step(lambda i=i: language_model_loss(model, *batch_at(i)), accumulation=2) for i in range(3)]
    assert [m["step_tokens"] for m in seen] == [128, 128, 128]
    assert [m["tokens"] for m in seen] == [128, 256, 384] and tr.tokens_seen == 384


def test_a_non_finite_gradient_with_a_finite_loss_is_skipped(tmp_path) -> None:
    """An overflow in backward alone (the loss is finite): no update, logged as a non-finite grad norm."""
    model = micro_model()
    tr = make_trainer(model, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def inf_grad():
        loss, m = language_model_loss(model, *batch_at(0))
        blow = model.lm_head.weight.sum() * 0.0
        blow.register_hook(lambda g: g * float("inf"))
        return loss + blow, m

    metrics = tr.step(inf_grad)
    assert math.isfinite(metrics["loss"]) and metrics["skipped"] == "non-finite grad norm"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_spike_guard_starts_after_spike_warmup_good_steps_and_tracks_a_running_mean(tmp_path) -> None:
    """The guard compares a loss with 0.95·mean + 0.05·loss over the accepted steps, from the step after
    `spike_warmup` accepted ones; spike_factor 0 turns it off (GRPO's losses change sign)."""
    values = iter([1.0, 3.0, 10.0, 10.0])

    def fixed():
        loss, m = language_model_loss(model, *batch_at(0))
        return loss * 0.0 + next(values), m

    model = micro_model()
    tr = make_trainer(model, tmp_path, spike_warmup=2)
    assert "skipped" not in tr.step(fixed) and tr._loss_mean == 1.0
    assert "skipped" not in tr.step(fixed)  # the second accepted step: still warming up
    assert tr._loss_mean == pytest.approx(0.95 * 1.0 + 0.05 * 3.0)
    assert "spike" in tr.step(fixed)["skipped"]  # 10 > 3 x 1.1: the third is guarded
    model = micro_model()
    tr = make_trainer(model, tmp_path / "off", spike_warmup=0, spike_factor=0.0)
    values = iter([1.0, 10.0])
    assert ["skipped" in tr.step(fixed) for _ in range(2)] == [False, False]


def test_an_accepted_step_resets_the_consecutive_skips(tmp_path) -> None:
    """max_consecutive_skips counts skips in a row: skip, good, skip does not stop a run allowed two."""
    model = micro_model()
    tr = make_trainer(model, tmp_path, max_consecutive_skips=2)
    bad = lambda: (torch.tensor(float("inf"), requires_grad=True), {})  # noqa: E731
    good = lambda: language_model_loss(model, *batch_at(0))  # noqa: E731
    for fn in (bad, good, bad):
        tr.step(fn)
    assert tr.skipped_steps == 2 and tr._consecutive_skips == 1


def test_expert_imbalance_max_is_the_worst_layers(tmp_path) -> None:
    """expert_imbalance per router is max load / mean load; its max over the routers is the summary."""
    model = micro_model()
    tr = make_trainer(model, tmp_path)
    m = tr.step(lambda: language_model_loss(model, *batch_at(0), mtp_weight=0.3))
    for layer, load in m["expert_load"].items():
        assert m["expert_imbalance"][layer] == pytest.approx((load.max() / load.mean()).item())
    assert len(m["expert_imbalance"]) == 2
    assert m["expert_imbalance_max"] == max(m["expert_imbalance"].values())


def test_a_router_that_routed_nothing_reports_no_imbalance(tmp_path) -> None:
    """Without the MTP loss (--mtp-weight 0, SFT, GRPO) the MTP router routes no token: it has no
    imbalance to report, not 0 / 0 read as 0 (below the perfect 1)."""
    model = micro_model()
    tr = make_trainer(model, tmp_path)
    m = tr.step(lambda: language_model_loss(model, *batch_at(0), mtp_weight=0.0))
    assert set(m["expert_imbalance"]) == {"1"} and set(m["expert_load"]) == {"1"}
    assert m["expert_imbalance"]["1"] >= 1.0


def test_loads_counted_outside_training_do_not_move_the_bias(tmp_path) -> None:
    """Tokens a router counted before the step (a generation in train mode, GRPO's rollouts) are not the
    step's load: each router's load is the step's own top-k picks."""
    model = micro_model(mtp=0)
    tr = make_trainer(model, tmp_path)
    (_, router), *_ = model.routers()
    router.expert_load += 1000.0
    x, y = batch_at(0)
    m = tr.step(lambda: language_model_loss(model, x, y))
    assert m["expert_load"]["1"].sum().item() == x.numel() * model.config.num_experts_per_tok


def test_a_step_trains_a_model_left_in_eval_mode(tmp_path) -> None:
    """`step` puts the model in train mode (routers count loads, the balance loss runs) whatever mode a
    stage's generation or evaluation left it in."""
    model = micro_model(mtp=0)
    tr = make_trainer(model, tmp_path)
    model.eval()
    m = tr.step(lambda: language_model_loss(model, *batch_at(0)))
    assert "balance_loss" in m and m["expert_load"]["1"].sum() > 0


def test_validate_is_the_mean_lm_loss_in_eval_mode_and_restores_the_mode(tmp_path) -> None:
    """The mean of the batches' lm_loss (the objective's extras left out), computed in eval mode; the
    model goes back to the mode it was in."""
    model = micro_model()
    tr = make_trainer(model, tmp_path)
    modes = []

    def val():
        modes.append(model.training)
        loss, m = language_model_loss(model, *batch_at(len(modes)), mtp_weight=0.5)
        return loss, m

    expected = [language_model_loss(model.eval(), *batch_at(i))[1]["lm_loss"].item() for i in (1, 2, 3)]
    model.train()
    assert tr.validate(val, 3) == pytest.approx(sum(expected) / 3, rel=1e-6)
    assert modes == [False] * 3 and model.training
    model.eval()
    tr.validate(val, 1)
    assert not model.training


def test_a_deadline_shorter_than_the_warmup_still_anneals(tmp_path, monkeypatch) -> None:
    """Every REFIT_EVERY steps the step count is refit to the pace; a refit to fewer steps than twice the
    warmup cuts the warmup to half the run: the run ends on the floor of its decay, not on its ramp."""
    import nanoseek.train.loop as loop

    model = micro_model(mtp=0)
    tr = make_trainer(model, tmp_path, steps=100, deadline=24.0, optim=OptimConfig(lr=1e-2, warmup_steps=50))
    monkeypatch.setattr(loop.time, "perf_counter", lambda: 2.0 * tr.global_step)
    totals = []
    while not tr.done:
        tr.step(lambda: language_model_loss(model, *batch_at(tr.global_step)))
        totals.append(tr.total_steps)
    assert totals[:4] == [100] * 4 and totals[4] == 12  # refit every REFIT_EVERY steps: 5 + (24 - 10) / 2
    assert tr.optim_config.warmup_steps <= tr.total_steps // 2
    assert tr.lr_at(tr.total_steps - 1) == pytest.approx(1e-2 * tr.optim_config.min_lr_ratio)


def test_a_checkpoint_is_not_due_when_the_deadline_ends_the_run(tmp_path, monkeypatch) -> None:
    """A time-budgeted stage saves once more when its deadline passes: a checkpoint due at that step
    would be a second full write of the same step (SFT's loop saved it twice)."""
    import nanoseek.train.loop as loop

    model = micro_model(mtp=0)
    tr = make_trainer(model, tmp_path, steps=100, checkpoint_every=2, deadline=7.0)
    monkeypatch.setattr(loop.time, "perf_counter", lambda: 2.0 * tr.global_step)
    due = []
    while not tr.done:
        tr.step(lambda: language_model_loss(model, *batch_at(tr.global_step)))
        due.append(tr.checkpoint_due())
    assert tr.global_step == 4 and due == [False, True, False, False]


def test_the_step_log_keeps_every_log_every_step_the_skipped_ones_and_the_last(tmp_path) -> None:
    log = StepLog(tmp_path, "pretrain", 5, log_every=3, progress=False)
    for step in range(1, 6):
        m = {"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "step_tokens": 8, "step_time_s": 0.1}
        log.step({**m, "skipped": "non-finite loss"} if step == 2 else m)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path, stage="pretrain")] == [2, 3, 5]


def test_a_wsd_decay_longer_than_the_run_after_warmup_starts_where_warmup_ends() -> None:
    """WSD whose decay_fraction reaches into the warmup decays from the end of the warmup, from the peak:
    no drop at the first step after it."""
    cfg = OptimConfig(warmup_steps=5, schedule="wsd", decay_fraction=0.8, min_lr_ratio=0.1)
    assert lr_multiplier(4, 10, cfg) == 1.0
    assert lr_multiplier(5, 10, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 5)))
    assert lr_multiplier(9, 10, cfg) == pytest.approx(0.1)


def test_the_objective_adds_the_sequence_wise_balance_loss_and_lambda_times_mtp() -> None:
    """V3 eq. 17-20 and 25: loss = CE + λ·L_MTP + the routers' balance loss (α > 0, training)."""
    model = micro_model().train()
    model.set_balance_alpha(0.01)
    loss, m = language_model_loss(model, *batch_at(0), mtp_weight=0.3)
    assert m["balance_loss"] > 0
    torch.testing.assert_close(loss.detach(), m["lm_loss"] + 0.3 * m["mtp_loss"] + m["balance_loss"])


# -------------------------------------------------------------- objective (hypothesis)
_MODEL = functools.cache(lambda: micro_model(mtp=2))


@settings(max_examples=25)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(2, 12)),
    seed=st.integers(0, 2**16),
    document_mask=st.booleans(),
    mtp_weight=st.sampled_from([0.0, 0.3]),
    micro_batches=st.integers(1, 2),
)
def test_the_loss_is_the_per_token_cross_entropy_of_every_head_over_the_whole_step(
    shape, seed, document_mask, mtp_weight, micro_batches
) -> None:
    """Packed rows (BOS 0 anywhere) with masked targets: lm_loss is the mean over the step's targets of
    each one's -log p, mtp_loss the mean over depths of each depth's (its targets those of
    `mtp_targets`, a depth with none adding 0), computed by the model alone on each document with the
    mask; cut into micro-batches whose shares of the step (`StepTargets`) add up to the same."""
    from nanoseek.model.attention import document_causal_mask, documents_from_bos
    from nanoseek.model.transformer import mtp_targets

    model = _MODEL()
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(1, VOCAB, (shape[0], shape[1] + 1), generator=g)
    row = row.masked_fill(torch.rand(row.shape, generator=g) < 0.25, 0)
    x, y = row[:, :-1], row[:, 1:].masked_fill(torch.rand(shape, generator=g) < 0.2, -100)
    positions = mask = doc_ids = None
    if document_mask:
        doc_ids, positions = documents_from_bos(x, 0)
        mask = document_causal_mask(doc_ids)
    with torch.no_grad():
        logits, hidden = model(x, positions, mask=mask, return_hidden=True)
        per_depth = model.mtp_logits(hidden, x, positions, mask)

    def mean_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
        nll = [
            -torch.log_softmax(logits[b, i].double(), -1)[t].item()
            for b in range(targets.shape[0])
            for i, t in enumerate(targets[b].tolist())
            if t != -100
        ]
        return sum(nll) / len(nll) if nll else math.nan

    lm = mean_nll(logits, y)
    mtp = [mean_nll(d, mtp_targets(y, k, doc_ids)) for k, d in enumerate(per_depth)]
    mtp = sum(0.0 if math.isnan(v) else v for v in mtp) / len(mtp)
    rows = (
        [list(range(shape[0]))]
        if micro_batches == 1
        else [list(range(0, shape[0], 2)), list(range(1, shape[0], 2))]
    )
    rows = [r for r in rows if r]
    counts = sum(target_counts(y[r], 2, doc_ids=None if doc_ids is None else doc_ids[r]) for r in rows)
    step = StepTargets(counts, micro_batches=len(rows)) if micro_batches > 1 else None
    got_lm = got_mtp = 0.0
    for r in rows:
        with torch.no_grad():
            loss, m = language_model_loss(
                model, x[r], y[r], mtp_weight, document_mask=document_mask, step=step
            )
        got_lm += m["lm_loss"].item() / len(rows)  # (the Trainer's mean over micro-batches)
        got_mtp += m.get("mtp_loss", torch.tensor(0.0)).item() / len(rows)
        # the loss is its terms' shares and the balance loss's (metrics are shares times micro-batches)
        terms = m["lm_loss"] + mtp_weight * m.get("mtp_loss", 0.0) + m.get("balance_loss", 0.0)
        torch.testing.assert_close(loss, terms / len(rows), atol=1e-5, rtol=1e-5, equal_nan=True)
    if math.isnan(lm):
        assert counts[0] == 0
        return
    assert got_lm == pytest.approx(lm, abs=1e-5)
    if mtp_weight:
        assert got_mtp == pytest.approx(mtp, abs=1e-5)
