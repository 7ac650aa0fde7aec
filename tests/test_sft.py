"""SFT data: loss only on assistant tokens through the chat template, and packing without leaks."""

from __future__ import annotations

import contextlib
import functools
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.train.sft import (
    IGNORE,
    LARGE_MODEL_LR,
    SMALL_MODEL_LR,
    PackedBatch,
    assistant_target_text,
    default_lr,
    pack_examples,
    packed_batch_at,
    sft_loss,
    tokenize_conversation,
)


class CharTokenizer:
    """One id per character plus the R1 special tokens, rendering the R1 chat template by the interface."""

    bos_token, eos_token = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    think_start, think_end = "<think>", "</think>"
    specials = [bos_token, eos_token, "<｜User｜>", "<｜Assistant｜>"]

    def __init__(self) -> None:
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 0, 1, 1

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        out = [self.bos_token_id] if add_bos else []
        i = 0
        while i < len(text):
            for j, s in enumerate(self.specials):
                if text.startswith(s, i):
                    out.append(j)
                    i += len(s)
                    break
            else:
                out.append(10 + ord(text[i]) % 200)
                i += 1
        return out

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        text = self.bos_token
        for m in messages:
            if m["role"] == "user":
                text += "<｜User｜>" + m["content"]
            elif m["role"] == "assistant":
                content = m["content"].split(self.think_end)[-1]  # R1 drops history reasoning
                text += "<｜Assistant｜>" + content + self.eos_token
        if add_generation_prompt:
            text += "<｜Assistant｜><think>\n"
        return self.encode(text) if tokenize else text

    def save(self, directory) -> None:
        """Checkpoints made with this tokenizer carry no tokenizer files."""


def _stepped_clock(monkeypatch, kill_at: int | None = None) -> tuple[list[float], list[int | None]]:
    """time.perf_counter stands still but for 0.1 s a training step; the step numbered `kill_at[0]`
    raises "killed" after it ran (a process killed there). Returns (now, kill_at), both mutable."""
    import time

    from nanoseek import perf
    from nanoseek.train import loop

    fake = lambda *a, **k: 1e30  # noqa: E731  (no peak to measure on a clock that stands still)
    fake.cache_clear = lambda: None
    monkeypatch.setattr(perf, "matmul_peak_flops", fake)
    now, kill = [0.0], [kill_at]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    step = loop.Trainer.step

    def timed_step(self, *args, **kwargs):
        now[0] += 0.1
        metrics = step(self, *args, **kwargs)
        if self.global_step == kill[0]:
            raise RuntimeError("killed")
        return metrics

    monkeypatch.setattr(loop.Trainer, "step", timed_step)
    return now, kill


def _train_with_budget(tmp_path, cfg, started: float, deadline_fn=None) -> list[dict]:
    """train_on_examples on a small model and 8 copies of one example; the step records it logged."""
    from model_configs import small_config
    from nanoseek.checkpoint import build_model
    from nanoseek.metrics import read_metrics
    from nanoseek.train.sft import train_on_examples

    model = build_model(small_config()).init_weights(0)
    ids = list(range(2, 30))
    examples = [(ids, [IGNORE] * 10 + ids[10:])] * 8
    path = train_on_examples(
        model, CharTokenizer(), examples, tmp_path, "control", cfg, None, started, deadline_fn=deadline_fn
    )
    assert (path / "config.json").exists()
    return [r for r in read_metrics(tmp_path, "control") if "loss" in r]


def test_assistant_target_text_shapes() -> None:
    msg = {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n4"}
    assert assistant_target_text(msg, prompt_opened_think=True) == "2+2=4\n</think>\n4"
    assert assistant_target_text(msg, prompt_opened_think=False) == msg["content"]
    rc = {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"}
    assert assistant_target_text(rc, True) == "2+2=4\n</think>\n4"
    assert assistant_target_text({"role": "assistant", "content": "hi"}, True) == "\n</think>\nhi"
    # the answer after reasoning_content starts on the line after </think>, however the content opens
    assert assistant_target_text({**rc, "content": "\n\n4"}, True) == "2+2=4\n</think>\n4"
    # after a tool's result the answer goes on: no think block is invented
    assert assistant_target_text({"role": "assistant", "content": "4"}, False, after_tool=True) == "4"


def test_reasoning_given_twice_is_one_think_block_and_an_unclosed_one_is_refused(tmp_path) -> None:
    """A message with reasoning_content whose content also holds it (an export that wrote it back) was
    trained as two think blocks in a row, by R1's template and by one that renders reasoning_content;
    a reply cut off inside its reasoning was trained to end its turn with the block still open."""

    tok = CharTokenizer()
    q = {"role": "user", "content": "q"}
    once = tokenize_conversation(tok, [q, {"role": "assistant", "content": "4", "reasoning_content": "2+2"}])
    for content in ("<think>\n2+2\n</think>\n\n4", "2+2</think>4"):
        twice = {"role": "assistant", "content": content, "reasoning_content": "2+2"}
        assert tokenize_conversation(tok, [q, twice]) == once
    other = {"role": "assistant", "content": "<think>1+3</think>4", "reasoning_content": "2+2"}
    with pytest.raises(ValueError, match=r"chat message 1 \(assistant\) has reasoning_content and other"):
        tokenize_conversation(tok, [q, other])
    cut = {"role": "assistant", "content": "<think>\n2+2 is"}
    with pytest.raises(ValueError, match=r"chat message 1 \(assistant\) opens <think> and never closes"):
        tokenize_conversation(tok, [q, cut])
    # as history (weight 0) it is the client's text, not a target
    assert tokenize_conversation(tok, [q, {**cut, "weight": 0}, q, {"role": "assistant", "content": "4"}])
    qwen = _reasoning_rendering_tokenizer(tmp_path)  # a template that renders reasoning_content (Qwen3's)
    twice = {"role": "assistant", "content": "<think>\n2+2\n</think>\n\n4", "reasoning_content": "2+2"}
    ((_, labels),) = tokenize_conversation(qwen, [q, twice])
    assert qwen.decode([t for t in labels if t != IGNORE]) == "<think>\n2+2\n</think>\n\n4<|im_end|>"


def test_reasoning_after_a_tool_result_is_trained_in_a_think_block_the_server_reads() -> None:
    """After a tool's result the prompt opens no think block; R1's raw "reasoning</think>answer" there
    was trained as is, so the server (which opens reasoning only at a leading <think>) showed it all as
    content, "</think>" included, while the template reads it as reasoning and an answer."""
    from nanoseek.serve.textstream import ReasoningSplitter

    for msg in (
        {"role": "assistant", "content": "2+2=4</think>\n\n4"},
        {"role": "assistant", "content": "<think>\n2+2=4\n</think>\n\n4"},
        {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"},
    ):
        target = assistant_target_text(msg, prompt_opened_think=False, after_tool=True)
        splitter = ReasoningSplitter(started_in_think=False)
        reasoning, content = splitter.push(target)
        tail = splitter.flush()
        assert ((reasoning + tail[0]).strip(), content + tail[1]) == ("2+2=4", "4"), target
    # an answer without reasoning still goes on as it is
    assert assistant_target_text({"role": "assistant", "content": "4"}, False, after_tool=True) == "4"


def test_reasoning_as_vllm_and_openrouter_name_it_is_trained_as_reasoning_content() -> None:
    """Chats saved from vLLM (vllm-project/vllm#27752) or OpenRouter carry the reasoning as `reasoning`:
    it was dropped without a word and the turn trained as an empty think block (a model taught to skip
    reasoning). DeepSeek's `reasoning_content` wins where a message has both."""
    tok = CharTokenizer()
    q = {"role": "user", "content": "q"}
    deepseek = tokenize_conversation(
        tok, [q, {"role": "assistant", "content": "4", "reasoning_content": "2+2"}]
    )
    vllm = tokenize_conversation(tok, [q, {"role": "assistant", "content": "4", "reasoning": "2+2"}])
    assert vllm == deepseek
    both = {"role": "assistant", "content": "4", "reasoning_content": "2+2", "reasoning": "other"}
    assert tokenize_conversation(tok, [q, both]) == deepseek
    # as history it is dropped as reasoning_content is (R1's template shows no past reasoning)
    later = [
        q,
        {"role": "assistant", "content": "4", "reasoning": "2+2"},
        q,
        {"role": "assistant", "content": "5"},
    ]
    plain = [q, {"role": "assistant", "content": "4"}, q, {"role": "assistant", "content": "5"}]
    assert tokenize_conversation(tok, later)[1] == tokenize_conversation(tok, plain)[1]


def test_a_completion_ended_by_any_stop_id_gets_no_other() -> None:
    from nanoseek.train.sft import completion_example

    assert completion_example([5], [7, 9], stop_ids=(8, 9)) == ([5, 7, 9], [IGNORE, 7, 9])
    assert completion_example([5], [7], stop_ids=(8, 9)) == ([5, 7, 8], [IGNORE, 7, 8])


def test_content_that_closes_the_prompts_think_block_is_its_reasoning() -> None:
    # R1's raw output after "<think>\n" lacks the opening tag: it was trained after an empty think
    # block of its own, "\n</think>\nr</think>\na", so the model learnt to skip reasoning
    msg = {"role": "assistant", "content": "2+2=4\n</think>\n\n4"}
    assert assistant_target_text(msg, prompt_opened_think=True) == msg["content"]
    assert assistant_target_text(msg, prompt_opened_think=False) == "<think>\n" + msg["content"]
    tok = CharTokenizer()
    ((ids, labels),) = tokenize_conversation(tok, [{"role": "user", "content": "q"}, msg])
    assert [lab for lab in labels if lab != IGNORE] == tok.encode(msg["content"]) + [tok.eos_token_id]


def test_loss_mask_covers_exactly_the_assistant_turns() -> None:
    tok = CharTokenizer()
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\na1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\na2"},
    ]
    exs = tokenize_conversation(tok, msgs)
    assert len(exs) == 2  # one example per assistant turn
    for (ids, labels), reasoning, answer in zip(exs, ["r1", "r2"], ["a1", "a2"], strict=True):
        trained = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]
        prompt = [t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE]
        assert trained == tok.encode(f"{reasoning}\n</think>\na{answer[-1]}") + [tok.eos_token_id]
        assert prompt == tok.apply_chat_template(
            msgs[: msgs.index(next(m for m in msgs if answer in m["content"]))], tokenize=True
        )
        assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels, strict=True))
    # the second turn's prompt holds the first answer without its reasoning
    assert tok.encode("r1") not in [exs[1][0][i : i + 2] for i in range(len(exs[1][0]))]
    with pytest.raises(ValueError, match="no assistant"):
        tokenize_conversation(tok, [{"role": "user", "content": "q"}])
    with pytest.raises(ValueError, match="role"):
        tokenize_conversation(tok, [{"content": "q"}])
    # OpenAI's fine-tuning "weight": 0 keeps a turn as history only (distill_data.jsonl's earlier answers)
    history = [{**msgs[1], "weight": 0}, *msgs[2:]]
    assert tokenize_conversation(tok, [msgs[0], *history]) == exs[1:]
    with pytest.raises(ValueError, match="no assistant"):
        tokenize_conversation(tok, [msgs[0], *history[:2]])
    for weight in (0.5, True):
        with pytest.raises(ValueError, match="'weight' must be 0 or 1"):
            tokenize_conversation(tok, [*msgs[:3], {**msgs[3], "weight": weight}])
    # an empty assistant turn is named among a chat's many (the data file's line alone did not say
    # which); with "weight": 0 it is history, as a client sends an empty reply back
    empty = [msgs[0], {"role": "assistant", "content": ""}, *msgs[2:]]
    with pytest.raises(ValueError, match=r"chat message 1 \(assistant\) has no content"):
        tokenize_conversation(tok, empty)
    assert len(tokenize_conversation(tok, [msgs[0], {**empty[1], "weight": 0}, *msgs[2:]])) == 1


def test_packing_blocks_attention_and_restarts_positions() -> None:
    exs = [([5, 6, 7], [IGNORE, 6, 7]), ([8, 9], [IGNORE, 9]), ([3, 4, 5, 6, 7, 8], [IGNORE] * 3 + [6, 7, 8])]
    rows = pack_examples(exs, seq_len=6, pad_id=0)
    assert len(rows) == 2  # 6 | 3+2 (+1 pad)
    ids, labels, pos, docs = rows[1]
    assert ids == [5, 6, 7, 8, 9, 0] and pos == [0, 1, 2, 0, 1, 0] and docs == [0, 0, 0, 1, 1, -1]
    assert labels[-1] == IGNORE
    batch = packed_batch_at(rows, 2, seed=0, step=0)
    mask = batch.attention_mask()
    assert mask.shape == (2, 6, 6)
    b = 0 if batch.input_ids[0, 0] == 5 else 1
    assert mask[b, 4, 3] and not mask[b, 4, 2] and not mask[b, 2, 3]  # no attention across examples
    assert batch.num_target_tokens == 3 + 3


def test_no_packed_example_is_trained_to_predict_the_next_ones_first_token() -> None:
    """Examples whose every token is a target (a completion with no prompt, pretraining-style labels):
    packed, the last token of one was trained to predict the first of the next, which it cannot see."""
    exs = [([5, 6, 7], [5, 6, 7]), ([8, 9], [8, 9])]
    ((ids, labels, _, docs),) = pack_examples(exs, seq_len=6)
    assert ids == [5, 6, 7, 8, 9, 0] and docs == [0, 0, 0, 1, 1, -1]
    assert labels == [IGNORE, 6, 7, IGNORE, 9, IGNORE]
    assert packed_batch_at([(ids, labels, _, docs)], 1, seed=0, step=0).num_target_tokens == 3
    # so an example whose one target is its first token has nothing to train on
    from nanoseek.train.sft import _check_targets_fit

    assert _check_targets_fit(exs, seq_len=6) == 3
    with pytest.raises(ValueError, match="no example has an assistant token within --seq-len 2"):
        _check_targets_fit([([5, 6], [5, IGNORE])], seq_len=2)


def test_packing_is_first_fit_and_scales_to_a_large_dataset() -> None:
    import random

    # first fit, longest first: each example in the first row with room
    rng = random.Random(0)
    exs = [([7] * n, [7] * n) for n in (rng.randint(2, 16) for _ in range(300))]
    expected: list[int] = []  # the room left in each row, by a scan of every row per example
    for n in sorted((len(ids) for ids, _ in exs), reverse=True):
        r = next((r for r, room in enumerate(expected) if n <= room), len(expected))
        if r == len(expected):
            expected.append(16)
        expected[r] -= n
    rows = pack_examples(exs, seq_len=16)
    assert [docs.count(-1) for _, _, _, docs in rows] == expected
    # a large SFT file: a scan of every row per example made packing quadratic (40k examples took
    # 33 s, a 1 GB file hours); the tree's first fit packs it in about a second
    assert len(pack_examples([([1, 2], [1, 2])] * 40_000, seq_len=2)) == 40_000


def test_packed_loss_equals_unpacked_loss() -> None:
    """Packing must not change what the model computes for each example."""
    from nanoseek.checkpoint import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only adds contention on a shared machine
    try:
        _check_packed_vs_single(load_model)
    finally:
        torch.set_num_threads(threads)


def _check_packed_vs_single(load_model) -> None:
    from nanoseek.checkpoint import build_model
    from nanoseek.config import get_preset

    cfg = get_preset("tiny").replace(
        hidden_size=64, num_hidden_layers=2, intermediate_size=128, moe_intermediate_size=32
    )
    model = build_model(cfg).init_weights(0).eval()
    model.set_balance_alpha(0.0)
    g = torch.Generator().manual_seed(0)
    exs = []
    for n in (9, 7, 12):
        ids = torch.randint(2, 4000, (n,), generator=g).tolist()
        exs.append((ids, [IGNORE] * 4 + ids[4:]))
    rows = pack_examples(exs, seq_len=16)
    with torch.no_grad():
        packed_sum, count = 0.0, 0
        for batch in [packed_batch_at(rows, 4, seed=0, step=0)]:  # every row: 3 examples fit 3 rows
            n = batch.num_target_tokens
            packed_sum += sft_loss(model, batch).item() * n
            count += n
        single_sum = 0.0
        for ids, labels in exs:
            one = PackedBatch(
                torch.tensor([ids]),
                torch.tensor([labels]),
                torch.arange(len(ids))[None],
                torch.zeros(1, len(ids)),
            )
            single_sum += sft_loss(model, one).item() * one.num_target_tokens
    assert packed_sum / count == pytest.approx(single_sum / count, rel=1e-4)


def test_sft_loss_predicts_each_answer_token_from_the_tokens_before_it() -> None:
    """labels[:, i] is token i's own label: the loss is the cross-entropy of the logits at i - 1 against
    it, over the answer tokens only (not of each position against its own token)."""
    from model_configs import small_config
    from nanoseek.checkpoint import build_model

    model = build_model(small_config()).init_weights(0).eval()
    ids = list(range(2, 14))
    labels = [IGNORE] * 4 + ids[4:]
    batch = PackedBatch(
        torch.tensor([ids]), torch.tensor([labels]), torch.arange(len(ids))[None], torch.zeros(1, len(ids))
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].float()
        expected = torch.nn.functional.cross_entropy(logits[3:-1], torch.tensor(ids[4:]))
        assert sft_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-5)


def test_padding_moves_neither_expert_load_nor_balance_loss() -> None:
    """A row's padding (one token, repeated) is routed too; it must not count in the loads that move
    the routing bias nor in the sequence-wise balance loss: the same examples padded by 0 or 47 tokens
    balance alike."""
    from model_configs import small_config
    from nanoseek.checkpoint import build_model

    model = build_model(small_config()).init_weights(0).train()
    model.set_balance_alpha(1e-3)
    g = torch.Generator().manual_seed(0)
    exs = [(torch.randint(2, 128, (n,), generator=g).tolist(),) * 2 for n in (10, 7)]
    seen = []
    for seq_len in (17, 64):
        sft_loss(model, packed_batch_at(pack_examples(exs, seq_len), 1, seed=0, step=0))
        seen.append((model.take_expert_load(), model.balance_loss().detach()))
    (load, loss), (load_padded, loss_padded) = seen
    assert all(torch.equal(load_padded[name], load[name]) for name in load)
    torch.testing.assert_close(loss_padded, loss)


@pytest.mark.parametrize("budget_spent", [True, False])
def test_time_budget_stops_early_and_still_saves(tmp_path, budget_spent) -> None:
    import time

    from nanoseek.train.sft import SFTConfig

    cfg = SFTConfig(init="", steps=4, batch_size=2, seq_len=32, progress=False, max_seconds=60.0)
    started = time.perf_counter() - (120.0 if budget_spent else 0.0)
    steps = [r["step"] for r in _train_with_budget(tmp_path, cfg, started)]
    assert steps == ([] if budget_spent else [1, 2, 3, 4])


def test_a_time_budgeted_run_says_its_step_count_is_a_first_plan(tmp_path, capsys) -> None:
    """With a budget the steps are an estimate the deadline refits: the header and the bar say so, not
    a total the run never meant (a 15 s budget read "50 steps of 2 rows", its bar an ETA of minutes)."""
    import time

    from nanoseek.train.sft import SFTConfig

    cfg = SFTConfig(init="", steps=4, batch_size=2, seq_len=32, max_seconds=60.0)
    _train_with_budget(tmp_path, cfg, time.perf_counter())
    out, err = capsys.readouterr()
    assert "; a 60s budget: 4 steps of 2 rows at first, refitted to the pace measured\n" in out, out
    assert "control (60s budget):" in err, err
    plain = SFTConfig(init="", steps=4, batch_size=2, seq_len=32)
    _train_with_budget(tmp_path / "plain", plain, time.perf_counter())
    out, err = capsys.readouterr()
    assert "; 4 steps of 2 rows\n" in out and "control: 100%" in err, out + err


def test_the_summary_gives_the_loss_of_the_last_step_kept_and_the_steps_skipped(tmp_path, capsys) -> None:
    """A last step skipped for a NaN loss ended SFT with "final loss nan" (its weights are the step
    before's), and the steps skipped went unsaid, as pretrain's summary and the report say them."""
    from nanoseek.train import loop
    from nanoseek.train.sft import SFTConfig

    step, losses = loop.Trainer.step, []

    def nan_at_the_last_step(self, loss_fn, accumulation=1):
        def fn():
            loss, m = loss_fn()
            return (loss * math.nan, m) if self.global_step == 3 else (loss, m)

        m = step(self, fn, accumulation)
        losses.append(m["loss"])
        return m

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop.Trainer, "step", nan_at_the_last_step)
        _train_with_budget(tmp_path, SFTConfig(init="", steps=4, batch_size=2, seq_len=32), 0.0)
    out = capsys.readouterr().out
    assert math.isnan(losses[-1])
    assert f"final loss {losses[-2]:.4f}, 1 step skipped; checkpoint" in out, out


def test_the_step_that_ends_a_diverged_run_is_in_metrics_jsonl(tmp_path, nan_losses) -> None:
    """As pretrain's: the step the divergence error names was left out of metrics.jsonl, the skipped
    steps before it were in."""
    from nanoseek.metrics import read_metrics
    from nanoseek.train import TrainingDiverged
    from nanoseek.train.sft import SFTConfig

    with pytest.raises(TrainingDiverged, match="optimizer steps 1-2"):
        _train_with_budget(tmp_path, SFTConfig(init="", steps=4, batch_size=2, seq_len=32), 0.0)
    recs = [r for r in read_metrics(tmp_path, "control") if "loss" in r]
    assert [(r["step"], r["skipped"]) for r in recs] == [(1, "non-finite loss"), (2, "non-finite loss")]


def test_the_budget_spent_line_starts_a_line_of_its_own_under_the_bar(tmp_path, monkeypatch) -> None:
    """Printed while the bar was still open, "time budget of 12s spent at step 3/50" ran on from the end
    of the bar's line ("...imb=3.50]sft: time budget ...")."""
    import io
    import re
    import sys
    import time

    from nanoseek.train.sft import SFTConfig

    terminal = io.StringIO()  # stdout and stderr on one terminal, as a user sees them
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    asked = []

    def deadline() -> float | None:  # unknown for two steps, then long past
        asked.append(1)
        return None if len(asked) < 3 else time.perf_counter() - 1.0

    cfg = SFTConfig(init="", steps=1000, batch_size=2, seq_len=32, warmup_steps=0)
    _train_with_budget(tmp_path, cfg, time.perf_counter(), deadline_fn=deadline)
    text = terminal.getvalue()
    assert "control: time budget spent at step 2/1000" in text, text
    assert not re.search(r"[^\r\n]control: time budget", text), text


def test_sft_steps_with_the_optimizer_it_is_given(tmp_path, monkeypatch) -> None:
    """--optimizer muon reaches the trainer: a Muon-pretrained model is fine-tuned in its own geometry."""
    import time

    from nanoseek.train import muon
    from nanoseek.train.sft import SFTConfig

    steps = []
    muon_step = muon.Muon.step
    monkeypatch.setattr(muon.Muon, "step", lambda self, *a, **k: steps.append(1) or muon_step(self, *a, **k))
    cfg = SFTConfig(init="", steps=3, batch_size=2, seq_len=32, progress=False, optimizer="muon")
    assert [r["step"] for r in _train_with_budget(tmp_path, cfg, time.perf_counter())] == [1, 2, 3]
    assert len(steps) == 3


def test_sft_trains_with_the_balance_loss_weight_its_config_records(tmp_path) -> None:
    """The sequence-wise balance loss α a checkpoint's config.json records (`aux_loss_alpha`, which
    pretrain --balance-alpha writes; 0.001 in DeepSeek-V2-Lite's) is the one its fine-tuning uses."""
    from model_configs import small_config
    from nanoseek.checkpoint import build_model
    from nanoseek.metrics import read_metrics
    from nanoseek.train.sft import SFTConfig, train_on_examples

    model = build_model(small_config(aux_loss_alpha=0.01)).init_weights(0)
    balance = model.balance_loss
    model.balance_loss = lambda: balance() * 0 + 0.5  # a known balance loss, still from the forward's graph
    ids = list(range(2, 30))
    cfg = SFTConfig(init="", steps=1, batch_size=2, seq_len=32, progress=False)
    train_on_examples(model, CharTokenizer(), [(ids, [IGNORE] * 10 + ids[10:])] * 4, tmp_path, "sft", cfg)
    routers = [r for _, r in model.routers()]
    assert routers and all(r.aux_loss_alpha == 0.01 for r in routers)
    # and the loss it steps on is the answer tokens' cross-entropy plus that balance loss
    (rec,) = [r for r in read_metrics(tmp_path, "sft") if "loss" in r]
    assert rec["loss"] == pytest.approx(rec["sft_loss"] + 0.5, rel=1e-5)


def test_an_interrupted_run_leaves_no_progress_bar_open(tmp_path, monkeypatch) -> None:
    """A notebook keeps an interrupted cell's traceback, and with it the bar: left open, it pushed every
    later bar of the session down a line, which a notebook draws as a new line per redraw."""
    from tqdm.auto import tqdm

    import nanoseek.train.sft
    from model_configs import small_config
    from nanoseek.checkpoint import build_model
    from nanoseek.train.sft import SFTConfig, train_on_examples

    calls = []
    sft_loss = nanoseek.train.sft.sft_loss

    def interrupt(model, batch):  # in the second step: the bar is drawn from the first step's end
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return sft_loss(model, batch)

    monkeypatch.setattr(nanoseek.train.sft, "sft_loss", interrupt)
    model = build_model(small_config()).init_weights(0)
    ids = list(range(2, 30))
    cfg = SFTConfig(init="", steps=2, batch_size=2, seq_len=32, progress=True)
    with pytest.raises(KeyboardInterrupt) as kept:  # holds the traceback, as IPython's sys.last_traceback
        train_on_examples(model, CharTokenizer(), [(ids, [IGNORE] * 10 + ids[10:])] * 4, tmp_path, "sft", cfg)
    assert kept.traceback and not [bar for bar in tqdm._instances if bar.desc.startswith("sft")]


def test_token_ids_beyond_the_models_vocabulary_are_refused_before_training(tmp_path) -> None:
    """A checkpoint whose vocab_size is smaller than its tokenizer's ids (the chat template's special
    tokens come last): the first step crashed with an IndexError in the embedding, a run directory made."""
    from model_configs import small_config
    from nanoseek.checkpoint import build_model
    from nanoseek.train.sft import SFTConfig, train_on_examples

    model = build_model(small_config(vocab_size=64)).init_weights(0)
    ids = [0, *range(2, 30), 64]  # the last one past the 64 rows of the embedding
    cfg = SFTConfig(init="", steps=1, batch_size=2, seq_len=32, progress=False)
    with pytest.raises(ValueError, match=r"token id 64, outside the model's vocabulary \[0, 64\)"):
        train_on_examples(
            model, CharTokenizer(), [(ids, [IGNORE] * 10 + ids[10:])] * 4, tmp_path / "run", "sft", cfg
        )
    assert not (tmp_path / "run").exists()


def test_sft_refuses_a_tokenizer_larger_than_the_models_vocabulary(narrow_checkpoint, tmp_path) -> None:
    """A checkpoint whose tokenizer has ids past its model's rows, named with both files at the start
    (`train_on_examples` said only that some id was out of range, once the data was built)."""
    from nanoseek.train.sft import SFTConfig, sft

    cfg = SFTConfig(
        init=narrow_checkpoint, task="arithmetic", out=str(tmp_path / "out"), steps=1, progress=False
    )
    with pytest.raises(ValueError, match="tokens but the model's vocab_size .* use the tokenizer"):
        sft(cfg)
    assert not (tmp_path / "out").exists()


def test_mfu_counts_no_mtp_flops_sft_does_not_run(tmp_path, monkeypatch) -> None:
    """SFT's loss is the main head's alone: a model with an MTP module must not be credited its FLOPs."""

    from model_configs import small_config
    from nanoseek import perf
    from nanoseek.accounting import flops_per_token
    from nanoseek.checkpoint import build_model
    from nanoseek.metrics import read_metrics
    from nanoseek.train.sft import SFTConfig, train_on_examples

    peak = 1e30
    fake = lambda *a, **k: peak  # noqa: E731
    fake.cache_clear = lambda: None
    monkeypatch.setattr(perf, "matmul_peak_flops", fake)
    config = small_config(num_nextn_predict_layers=1)
    ids = list(range(2, 30))
    cfg = SFTConfig(init="", steps=1, batch_size=2, seq_len=32, progress=False)
    model = build_model(config).init_weights(0)
    train_on_examples(model, CharTokenizer(), [(ids, [IGNORE] * 10 + ids[10:])] * 4, tmp_path, "sft", cfg)
    (record,) = [r for r in read_metrics(tmp_path, "sft") if "mfu" in r]
    counted = record["mfu"] * peak / record["tok_per_s"]
    assert counted == pytest.approx(flops_per_token(config, 32, training=True), rel=1e-6)


def test_time_budget_refits_the_schedule_to_anneal_by_the_deadline(tmp_path, monkeypatch) -> None:
    import itertools
    import time

    from nanoseek.train.sft import SFTConfig

    clock = itertools.count(0.0, 0.01)  # a clock that advances with every reading: pace is deterministic
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    # the first estimate (10 steps) is far too low for the 1.5 s budget: the run must take more steps
    cfg = SFTConfig(
        init="", steps=10, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=0, progress=False, max_seconds=1.5
    )
    records = _train_with_budget(tmp_path, cfg, time.perf_counter())
    assert len(records) > 10, len(records)
    # annealed: the last step's learning rate is the schedule's floor, not a cut-off mid-decay value
    assert records[-1]["lr"] <= 1e-3 * (cfg.min_lr_ratio + 0.05)


def test_a_budget_shorter_than_the_warmup_still_anneals(tmp_path, monkeypatch) -> None:
    """The warmup was cut to half the first estimate only: a budget refitted to fewer steps than the
    warmup ended on its ramp (`--max-seconds 15` from 28 planned steps: 6 steps, the last at 0.6 x
    --lr, never decayed)."""
    import itertools
    import time

    from nanoseek.train.sft import SFTConfig

    clock = itertools.count(0.0, 0.01)
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    cfg = SFTConfig(
        init="",
        steps=100,
        batch_size=2,
        seq_len=32,
        lr=1e-3,
        warmup_steps=50,
        progress=False,
        max_seconds=1.0,
    )
    records = _train_with_budget(tmp_path, cfg, time.perf_counter())
    assert 5 < len(records) < cfg.warmup_steps, len(records)  # refitted to fewer steps than the warmup
    assert records[-1]["lr"] <= 1e-3 * (cfg.min_lr_ratio + 0.05)


def test_a_deadline_known_only_as_it_goes_stops_the_run(tmp_path, monkeypatch) -> None:
    """The control beside GRPO: no deadline until GRPO's pace is known, then one that moves; the run
    stops at the first step that finds it passed, its schedule refitted to it, and still saves."""
    import itertools
    import time

    from nanoseek.train.sft import SFTConfig

    clock = itertools.count(0.0, 0.01)
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    asked = []

    def deadline() -> float | None:
        asked.append(1)
        return None if len(asked) < 3 else 0.6  # unknown for two steps, then 0.6 s on the clock

    cfg = SFTConfig(init="", steps=1000, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=0, progress=False)
    records = _train_with_budget(tmp_path, cfg, time.perf_counter(), deadline_fn=deadline)
    assert 2 < len(records) < 1000, len(records)
    assert records[-1]["lr"] <= 1e-3 * (cfg.min_lr_ratio + 0.05)  # annealed by the deadline


@pytest.mark.parametrize("planned", [10, 100])
def test_a_resumed_time_budget_goes_on_with_what_was_left_of_it(tmp_path, monkeypatch, planned) -> None:
    """--max-seconds with --resume: the run goes on as if never stopped, with the step count refitted to
    the budget and the budget's time left. From the first estimate, a run that had outgrown it (10
    planned, 30 fitted) trained nothing more; one planned longer (100) restarted its decay and its
    budget (41 steps where 30 fit)."""
    import time

    from nanoseek.train.sft import SFTConfig

    now, kill_at = _stepped_clock(monkeypatch)
    kw = dict(init="", steps=planned, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=0, progress=False)
    cfg = SFTConfig(**kw, max_seconds=3.0, checkpoint_every=5)
    whole = _train_with_budget(tmp_path / "whole", cfg, time.perf_counter())
    assert 28 <= len(whole) <= 31  # 3 s at 0.1 s a step
    kill_at[0] = 12
    with pytest.raises(RuntimeError, match="killed"):
        _train_with_budget(tmp_path / "run", cfg, time.perf_counter())
    kill_at[0] = None
    resumed = _train_with_budget(
        tmp_path / "run", SFTConfig(**kw, max_seconds=3.0, resume=True), time.perf_counter()
    )
    resumed = resumed[11:]  # the killed process logged steps 1-11; its checkpoint is step 10's
    assert resumed and resumed[0]["step"] == 11
    assert resumed[0]["lr"] == pytest.approx(whole[10]["lr"])  # the decay goes on where it was
    assert abs(resumed[-1]["step"] - len(whole)) <= 2  # the budget's rest, not a fresh one
    assert resumed[-1]["lr"] <= 1e-3 * (cfg.min_lr_ratio + 0.05)


def test_a_resumed_run_with_a_deadline_known_only_as_it_goes_keeps_its_refitted_steps(
    tmp_path, monkeypatch
) -> None:
    """The control beside GRPO, stopped and rerun: its deadline is unknown when it resumes, and the step
    count it goes on with was the first plan (10), which the refitted run (~30) had outgrown: the rerun
    said "nothing to train" and the control stopped with half its time left."""

    from nanoseek.train.sft import SFTConfig

    now, kill_at = _stepped_clock(monkeypatch, kill_at=12)

    def deadline_fn():  # unknown at each process's first step, then 3 s on the clock
        asked.append(1)
        return None if len(asked) == 1 else 3.0

    kw = dict(init="", steps=10, batch_size=2, seq_len=32, lr=1e-3, warmup_steps=0, progress=False)
    asked = []
    with pytest.raises(RuntimeError, match="killed"):
        _train_with_budget(tmp_path, SFTConfig(**kw, checkpoint_every=5), 0.0, deadline_fn=deadline_fn)
    kill_at[0], asked = None, []
    records = _train_with_budget(tmp_path, SFTConfig(**kw, resume=True), 0.0, deadline_fn=deadline_fn)
    resumed = records[11:]  # the killed process logged steps 1-11; its checkpoint is step 10's
    assert resumed and resumed[0]["step"] == 11
    assert resumed[0]["lr"] > 0.5e-3  # mid-decay of ~30 steps, not past the end of 10
    assert resumed[-1]["step"] >= 25  # trained until the deadline


def test_a_resume_of_a_run_that_spent_its_budget_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    """A run the deadline stopped (step 3 of 4) has no time left: resumed with its budget, it is finished,
    as one that ran all its steps is. It saved its checkpoint again, and its end record added this
    process's time to the stage's."""
    import time

    from nanoseek.report import RunMetrics, stopped
    from nanoseek.train.sft import SFTConfig

    now, _ = _stepped_clock(monkeypatch)
    kw = dict(init="", steps=4, batch_size=2, seq_len=32, warmup_steps=0, progress=False, max_seconds=0.25)
    assert len(_train_with_budget(tmp_path, SFTConfig(**kw), time.perf_counter())) == 3
    weights = tmp_path / "control" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    now[0] += 5.0  # data building and loading: time, but not the budget's any more
    started = time.perf_counter()
    now[0] += 5.0
    capsys.readouterr()
    assert len(_train_with_budget(tmp_path, SFTConfig(**kw, resume=True), started)) == 3
    assert "nothing to train" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == written
    assert not stopped(RunMetrics(tmp_path).runs["control"][-1][1])


def test_epochs_set_the_steps_and_each_epoch_is_every_row_once_reshuffled(tmp_path) -> None:
    """Without --steps a run is --epochs passes over the packed rows, a last batch short of rows
    counting as a step (8 rows of 3: 3 steps an epoch), and each epoch takes every row once, in its own
    order."""
    import time

    from nanoseek.train.sft import SFTConfig

    cfg = SFTConfig(init="", epochs=2, batch_size=3, seq_len=32, progress=False)
    assert [r["step"] for r in _train_with_budget(tmp_path, cfg, time.perf_counter())] == [1, 2, 3, 4, 5, 6]
    rows = [([k] * 4, [k] * 4, [0, 1, 2, 3], [0] * 4) for k in range(8)]
    epochs = [
        [
            int(t)
            for step in range(4 * e, 4 * e + 4)
            for t in packed_batch_at(rows, 2, 0, step).input_ids[:, 0]
        ]
        for e in range(3)
    ]
    assert all(sorted(order) == list(range(8)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3


def test_a_long_run_shuffles_its_rows_once_an_epoch_not_at_every_step(monkeypatch) -> None:
    """Each step's batch is a slice of its epoch's order: the order (a shuffle of every row) is drawn
    once per epoch, so a step's cost does not grow with the dataset; the batches are those of the
    order drawn afresh at each step."""
    import random

    rows = [([k] * 4, [k] * 4, [0, 1, 2, 3], [0] * 4) for k in range(40)]
    first = [packed_batch_at(rows, 4, 5, step).input_ids[:, 0].tolist() for step in range(30)]
    shuffles = []
    real = random.Random.shuffle

    def counted(self, x):
        shuffles.append(len(x))
        return real(self, x)

    monkeypatch.setattr(random.Random, "shuffle", counted)
    again = [packed_batch_at(rows, 4, 7, step).input_ids[:, 0].tolist() for step in range(30)]
    assert shuffles == [40] * 3  # 30 steps of 4 rows from 40: three epochs, one shuffle each
    for step in range(30):  # the same order a shuffle at every step would give
        order = list(range(40))
        real(random.Random(7 * 1_000_003 + step // 10), order)
        assert again[step] == order[step % 10 * 4 : step % 10 * 4 + 4]
    assert first != again


def test_a_short_run_still_warms_up_and_anneals(tmp_path) -> None:
    """--warmup-steps (default 10) is cut to half of a shorter run: 4 steps end at the schedule's floor,
    not on the warmup's ramp at 0.4 x --lr."""
    import time

    from nanoseek.train.sft import SFTConfig

    cfg = SFTConfig(init="", steps=4, batch_size=2, seq_len=32, lr=1e-3, progress=False)
    records = _train_with_budget(tmp_path, cfg, time.perf_counter())
    assert records[-1]["lr"] == pytest.approx(1e-3 * cfg.min_lr_ratio)


def test_a_deadline_not_known_yet_keeps_the_time_budget(tmp_path) -> None:
    """A `deadline_fn` that knows no deadline yet (None) leaves --max-seconds' in force."""
    import time

    from nanoseek.train.sft import SFTConfig

    cfg = SFTConfig(init="", steps=4, batch_size=2, seq_len=32, progress=False, max_seconds=60.0)
    assert _train_with_budget(tmp_path, cfg, time.perf_counter() - 120.0, deadline_fn=lambda: None) == []


def test_tool_use_conversation(tmp_path) -> None:
    """Tool calls are trained on (the same template as the server renders them), tool results are
    prompt only, and the answer after a tool result continues the turn without a think block."""
    from nanoseek.tokenizer import TOOL_CALLS_BEGIN, TOOL_OUTPUT_END, render_tool_calls
    from serve_fakes import tiny_tokenizer

    tok = tiny_tokenizer()
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "", "reasoning_content": "use the tool", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ]
    (ids1, labels1), (ids2, labels2) = tokenize_conversation(tok, msgs, tools)
    trained1 = tok.decode([t for t, lab in zip(ids1, labels1, strict=True) if lab != IGNORE])
    assert trained1 == "use the tool\n</think>\n" + render_tool_calls(calls) + "<｜end▁of▁sentence｜>"
    prompt1 = tok.decode([t for t, lab in zip(ids1, labels1, strict=True) if lab == IGNORE])
    assert "### add" in prompt1 and prompt1.endswith("<｜Assistant｜><think>\n")
    prompt2 = tok.decode([t for t, lab in zip(ids2, labels2, strict=True) if lab == IGNORE])
    trained2 = tok.decode([t for t, lab in zip(ids2, labels2, strict=True) if lab != IGNORE])
    assert prompt2.endswith(TOOL_OUTPUT_END) and TOOL_CALLS_BEGIN in prompt2
    assert trained2 == "It is 4.<｜end▁of▁sentence｜>"
    assert ids2 == tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=True, tools=tools)
    with pytest.raises(ValueError, match="message 1: tool_calls must be a list"):  # one call, not a list
        tokenize_conversation(tok, [msgs[0], {"role": "assistant", "tool_calls": calls[0]}], tools)

    from nanoseek.train.sft import read_chat_jsonl

    data = tmp_path / "chat.jsonl"
    data.write_text(
        json.dumps({"messages": msgs, "tools": tools}) + "\n" + json.dumps({"messages": msgs[:2]}) + "\n"
    )
    assert list(read_chat_jsonl(data)) == [(msgs, tools), (msgs[:2], None)]


def test_a_turn_of_tool_calls_alone_is_built_as_r1_trains_it_after_a_prompt_that_opens_think() -> None:
    """The template's rendering of a turn is its target only where it continues the prompt: after R1's
    "<think>\n" it does not, and a turn with no text (tool calls alone) is found in any offset of it."""
    from nanoseek.tokenizer import render_tool_calls
    from serve_fakes import tiny_tokenizer

    tok = tiny_tokenizer()
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    calls = [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    ((ids, labels),) = tokenize_conversation(tok, msgs, tools)
    trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert trained == "\n</think>\n" + render_tool_calls(calls) + "<｜end▁of▁sentence｜>"


def test_tool_calls_are_trained_in_the_markup_the_template_writes() -> None:
    """A template that writes calls as DeepSeek-V3's and R1's do (R1-Distill's: `function<sep>NAME` and
    ```json-fenced arguments) shows them so in history, but its turns were trained on V3.1's markup:
    one model taught two. The target's calls are the template's own."""
    import copy

    from nanoseek.tokenizer import render_tool_calls
    from serve_fakes import V3_TOOL_TEMPLATE, tiny_tokenizer

    tok = copy.copy(tiny_tokenizer())
    tok.chat_template = V3_TOOL_TEMPLATE
    calls = [
        {"id": f"c{i}", "type": "function", "function": {"name": "add", "arguments": f'{{"a": {i}}}'}}
        for i in range(2)
    ]
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": None, "tool_calls": calls}]
    ((ids, labels),) = tokenize_conversation(tok, msgs)
    trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    rendered = render_tool_calls(calls, fenced=True)
    assert trained == "\n</think>\n" + rendered + "<｜end▁of▁sentence｜>"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith(
        rendered + "<｜end▁of▁sentence｜>"
    )


def test_another_familys_template_is_trained_as_it_renders(tmp_path) -> None:
    """A checkpoint with its own chat template (a Qwen2 one: ChatML, EOS <|im_end|>) is trained on exactly
    the ids that template renders for each assistant turn, through its end token: no R1 think block."""
    from model_configs import chatml_tokenizer
    from nanoseek.tokenizer import load_tokenizer

    chatml_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "3+3=6"},
    ]
    (ids1, labels1), (ids2, labels2) = tokenize_conversation(tok, msgs)
    assert [t for t in labels1 if t != IGNORE] == tok.encode("4") + [tok.eos_token_id]
    full = tok.apply_chat_template(msgs[:3], add_generation_prompt=False, tokenize=True)
    assert ids1 == full[: len(ids1)] and tok.decode(full[len(ids1) :]) == "\n"
    # reasoning this template does not render is still trained, in R1's think block
    trained2 = tok.decode([t for t in labels2 if t != IGNORE])
    assert trained2 == "<think>\n3+3=6\n</think>\n6<|im_end|>"


def _reasoning_rendering_tokenizer(tmp_path):
    """A ChatML tokenizer whose template renders an assistant's reasoning_content itself (Qwen3's)."""
    from model_configs import chatml_tokenizer
    from nanoseek.tokenizer import load_tokenizer

    chatml_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.get('reasoning_content') %}"
        "<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(tmp_path)


def test_history_reasoning_is_left_out_of_the_prompt_as_serve_does(tmp_path) -> None:
    # serve drops reasoning_content from the messages it renders; a template that renders it (Qwen3's)
    # was given it in SFT's prompts: trained on a history the server never shows
    from nanoseek.serve.app import Server
    from nanoseek.serve.protocol import ChatCompletionRequest

    tok = _reasoning_rendering_tokenizer(tmp_path)
    msgs = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "3+3=6"},
    ]
    _, (ids2, labels2) = tokenize_conversation(tok, msgs)
    served = tok.apply_chat_template(Server.chat_messages(ChatCompletionRequest(messages=msgs[:3]).messages))
    start = next(j for j, lab in enumerate(labels2) if lab != IGNORE)
    assert ids2[:start] == tok.encode(served)
    # the turn's own reasoning is still trained, as the template renders it
    assert tok.decode([t for t in labels2 if t != IGNORE]) == "<think>\n3+3=6\n</think>\n\n6<|im_end|>"


def test_cold_start_chats_ask_several_problems_in_a_row_each_once() -> None:
    from nanoseek.data.rewards import script_counts
    from nanoseek.train.sft import task_conversations

    alone = task_conversations("addition,comparison,sorting", 300, seed=1)
    assert all(len(c) == 2 for c in alone)  # multi_turn=0: one question a chat, as before
    chats = task_conversations("addition,comparison,sorting", 300, seed=1, multi_turn=0.3)
    turns = [tuple(m["content"] for m in c[i : i + 2]) for c in chats for i in range(0, len(c), 2)]
    assert sorted(turns) == sorted(tuple(m["content"] for m in c) for c in alone)  # the same, each once
    several = [c for c in chats if len(c) > 2]
    assert {len(c) for c in several} == {4, 6} and 0.2 < len(several) / len(chats) < 0.4
    for c in several:
        assert [m["role"] for m in c] == ["user", "assistant"] * (len(c) // 2)

        def script(text: str) -> str:
            n = script_counts(text)
            return "ja" if n["kana"] else "zh" if n["han"] else "en"

        assert len({script(m["content"]) for m in c if m["role"] == "user"}) == 1  # one language a chat
    with pytest.raises(ValueError, match="multi_turn"):
        task_conversations("addition", 10, multi_turn=2.0)


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        (dict(batch_size=0), "--batch-size"),
        (dict(batch_size=-1), "--batch-size"),
        (dict(steps=0), "--steps"),  # left out (None) means --epochs passes; 0 is no step count
        (dict(steps=-2), "--steps"),
        (dict(epochs=0), "--epochs"),
        (dict(epochs=-1), "--epochs"),
        (dict(task_examples=0), "--task-examples"),
        (dict(task_examples=-5), "--task-examples"),
        (dict(seq_len=1), "--seq-len"),
        (dict(max_seconds=-1.0), "--max-seconds"),
        (dict(max_seconds=0.0), "--max-seconds"),
        # inf: an OverflowError at the first refit of the schedule, the steps before it unsaved
        (dict(max_seconds=math.inf), "--max-seconds"),
        (dict(weight_decay=math.nan), "--weight-decay"),  # refused only after the data was tokenized
        (dict(weight_decay=math.inf), "--weight-decay"),
        (dict(lr=0.0), "--lr"),
        (dict(warmup_steps=-1), "--warmup-steps"),
        (dict(min_lr_ratio=2.0), "--min-lr-ratio"),
        (dict(optimizer="sgd"), "--optimizer"),
        (dict(threads=0), "--threads"),  # as pretrain's and grpo's: 0 ignored, -1 torch's traceback
    ],
)
def test_sft_config_names_the_flag_out_of_range(changes, flag) -> None:
    from nanoseek.train.sft import SFTConfig

    with pytest.raises(ValueError, match=f"^{flag} "):
        SFTConfig(init="", **changes).validate()


def test_sft_command_refuses_a_bad_number_before_loading_anything(capsys) -> None:
    from nanoseek.cli import main

    argv = ["sft", "--init", "no/such-checkpoint", "--task", "addition", "--batch-size", "0"]
    assert main(argv) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--language", "ja"], ["--multi-turn", "0.5"]])
def test_sft_refuses_task_flags_without_a_task(flag, capsys) -> None:
    """--language and --multi-turn pick and shape --task's chats; with --data alone they changed nothing
    and the run trained on every line of the file, in every language."""
    from nanoseek.cli import main

    assert main(["sft", "--init", "no/such-checkpoint", "--data", "chat.jsonl", *flag]) == 2
    assert f"{flag[0]} shapes the chats built from --task" in capsys.readouterr().err


def test_sft_without_data_or_task_is_refused_before_the_init_resolves(capsys) -> None:
    """A Hub --init was downloaded (all its weights; offline, the Hub's error said instead) before sft
    said there was nothing to train on."""
    from nanoseek.cli import main

    assert main(["sft", "--init", "no/such-checkpoint"]) == 2
    assert "give --data chat.jsonl and/or --task NAME" in capsys.readouterr().err


def test_a_task_list_from_python_is_taken_as_the_flags_comma_separated_names() -> None:
    """`SFTConfig(task=["addition", "comparison"])`, as grpo's and distill's configs and
    `task_conversations` take tasks, was refused: "--task must be of type str | None"."""
    from nanoseek.data.tasks import split_task_list
    from nanoseek.train.sft import SFTConfig

    cfg = SFTConfig(init="ck", task=["addition", "arithmetic?ops=add,sub"])
    cfg.validate()
    assert cfg.task == "addition,arithmetic?ops=add,sub"
    assert split_task_list(cfg.task) == ["addition", "arithmetic?ops=add,sub"]
    with pytest.raises(ValueError, match=r"--task must be of type str \| list\[str\] \| None"):
        SFTConfig(init="ck", task=[1]).validate()


def test_a_seq_len_that_cuts_off_every_answer_is_an_error(tmp_path) -> None:
    """Cut to 8 tokens, every example is part of its 10-token prompt: no step would have a target."""
    from nanoseek.train.sft import SFTConfig

    cfg = SFTConfig(init="", steps=2, batch_size=2, seq_len=8, progress=False)
    with pytest.raises(
        ValueError, match=r"no example has an assistant token within --seq-len 8 \(.* 10 tokens"
    ):
        _train_with_budget(tmp_path, cfg, 0.0)
    assert not (tmp_path / "control").exists()


def test_a_seq_len_past_the_models_context_is_refused(tmp_path) -> None:
    """Rows longer than max_position_embeddings trained positions the engine never serves (pretrain and
    the engine refuse them); it ran silently."""
    from nanoseek.train.sft import SFTConfig

    cfg = SFTConfig(init="", steps=1, batch_size=2, seq_len=512, progress=False)  # the model holds 256
    with pytest.raises(
        ValueError, match=r"--seq-len 512 exceeds the model's max_position_embeddings \(256\)"
    ):
        _train_with_budget(tmp_path, cfg, 0.0)
    assert not (tmp_path / "control").exists()


def test_sft_logs_its_run_and_resumes_only_the_same_run(tmp_path, capsys) -> None:
    """Start and end records (the wall time the report shows); a resume with another --seed (another
    order of batches) is refused, one with more steps goes on, and its summary counts the steps it ran
    in its seconds (it said 3 steps, the checkpoint's 2 with them)."""
    import time

    from nanoseek.metrics import read_metrics
    from nanoseek.report import RunMetrics, stopped
    from nanoseek.train.sft import SFTConfig

    cfg = SFTConfig(init="", steps=2, batch_size=2, seq_len=32, progress=False)
    _train_with_budget(tmp_path, cfg, time.perf_counter())
    events = [r for r in read_metrics(tmp_path, "control") if r.get("event")]
    assert [r["event"] for r in events] == ["start", "model", "end"] and events[2]["wall_time_s"] > 0
    assert events[0]["precision"] == "fp32"  # the report's stage table names it, as pretraining's
    with pytest.raises(ValueError, match="--seed: 0 -> 1"):
        _train_with_budget(
            tmp_path,
            SFTConfig(init="", steps=3, batch_size=2, seq_len=32, seed=1, resume=True, progress=False),
            time.perf_counter(),
        )
    with pytest.raises(ValueError, match="--seq-len: 32 -> 24"):  # other rows, another order of batches
        _train_with_budget(
            tmp_path,
            SFTConfig(init="", steps=3, batch_size=2, seq_len=24, resume=True, progress=False),
            time.perf_counter(),
        )
    # the first run's precision was auto, resolved to fp32 on a CPU: naming fp32 is the same run
    more = SFTConfig(
        init="", steps=3, batch_size=2, seq_len=32, resume=True, progress=False, precision="fp32"
    )
    capsys.readouterr()
    assert [r["step"] for r in _train_with_budget(tmp_path, more, time.perf_counter())] == [1, 2, 3]
    assert "control: 1 step in " in capsys.readouterr().out
    # a resume of the finished run writes nothing: the checkpoint stays, its time counts once
    weights = tmp_path / "control" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    wall = RunMetrics(tmp_path).wall_time("control")
    _train_with_budget(tmp_path, more, time.perf_counter())
    assert weights.stat().st_mtime_ns == written
    assert RunMetrics(tmp_path).wall_time("control") == wall and not stopped(
        RunMetrics(tmp_path).runs["control"][-1][1]
    )


def test_checkpoint_every_saves_during_the_run_and_a_killed_run_resumes_from_it(
    tmp_path, monkeypatch
) -> None:
    """--checkpoint-every K saves every K steps (it was accepted and ignored: a run killed late lost
    every step); resumed from it, the run's losses are those of one run."""
    import time

    from nanoseek.train import loop
    from nanoseek.train.sft import SFTConfig

    kw = dict(init="", steps=4, batch_size=2, seq_len=32, checkpoint_every=2, progress=False)
    whole = [r["loss"] for r in _train_with_budget(tmp_path / "whole", SFTConfig(**kw), time.perf_counter())]
    step = loop.Trainer.step

    def killed_at_3(self, *args, **kwargs):
        metrics = step(self, *args, **kwargs)
        if self.global_step == 3:
            raise RuntimeError("killed")
        return metrics

    monkeypatch.setattr(loop.Trainer, "step", killed_at_3)
    with pytest.raises(RuntimeError, match="killed"):
        _train_with_budget(tmp_path / "run", SFTConfig(**kw), time.perf_counter())
    monkeypatch.setattr(loop.Trainer, "step", step)
    assert (
        json.loads((tmp_path / "run" / "control" / "train_state" / "trainer.json").read_text())["step"] == 2
    )
    records = _train_with_budget(tmp_path / "run", SFTConfig(**kw, resume=True), time.perf_counter())
    assert [r["loss"] for r in records[-2:]] == whole[2:]


@pytest.mark.parametrize("content", [[{"type": "image_url", "image_url": {"url": "x"}}], None, "", 5])
def test_assistant_target_refuses_non_text_or_empty(content) -> None:
    with pytest.raises(ValueError):
        assistant_target_text({"role": "assistant", "content": content}, prompt_opened_think=True)


def test_openai_developer_role_and_text_parts_train_as_serve_reads_them(micro_checkpoint) -> None:
    """OpenAI's `developer` role and content parts: serve takes them as the system role and joined
    text, and so does SFT (it refused both), each conversation giving the examples of its plain form."""
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_checkpoint)
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}]  # joined by a newline
    openai_style = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": parts},
        {"role": "assistant", "content": [{"type": "text", "text": "4"}]},
    ]
    plain = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is\n2 + 2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert tokenize_conversation(tok, openai_style) == tokenize_conversation(tok, plain)
    image = [*openai_style[:2], {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
    with pytest.raises(ValueError, match="content part type 'image_url' is not supported"):
        tokenize_conversation(tok, [*image, openai_style[2]])


def test_examples_whose_prompt_fills_seq_len_are_dropped(micro_checkpoint, tmp_path, capsys) -> None:
    # a row of labels all IGNORE: a batch of such rows had a NaN loss (a skipped step, counted)
    from nanoseek.checkpoint import load_model
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.sft import SFTConfig, train_on_examples

    tk = load_tokenizer(micro_checkpoint)
    long_prompt = [tk.bos_token_id] * 40
    examples = [(long_prompt + [5, 6], [IGNORE] * 40 + [5, 6]), ([1, 2, 3, 4], [IGNORE, IGNORE, 3, 4])]
    examples.append(([7, 8, 9], [7, IGNORE, IGNORE]))  # its one target, its first token, is never trained
    cfg = SFTConfig(init=micro_checkpoint, steps=1, batch_size=1, seq_len=16, progress=False, seed=0)
    train_on_examples(load_model(micro_checkpoint), tk, examples, tmp_path, "sft", cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(x == x for x in losses)  # no NaN (skipped) step
    assert "; 2 examples dropped" in capsys.readouterr().out


def test_a_bad_conversation_is_named_by_its_line(micro_checkpoint, tmp_path) -> None:
    # "conversation N" counted conversations, not lines: with blank lines it pointed at the wrong one
    from nanoseek.train.sft import SFTConfig, sft

    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": {"text": "a"}}]}
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(good) + "\n\n\n" + json.dumps(bad) + "\n")
    cfg = SFTConfig(init=micro_checkpoint, data=str(data), out=str(tmp_path / "out"), steps=1, progress=False)
    # and by its message: a chat of dozens of messages was named by its line alone
    with pytest.raises(
        ValueError, match=rf"{data}:4: chat message 1 \(assistant\): content must be a string or a list"
    ):
        sft(cfg)


def test_gzipped_chat_data_is_read_as_the_corpus_reads_it(tmp_path) -> None:
    """`sft --data chat.jsonl.gz` (as `pretrain --data` takes .gz) was "chat.jsonl.gz:1: not valid
    UTF-8"; a truncated download or a folder is a clear error, not a traceback."""
    import gzip

    from nanoseek.train.sft import read_chat_jsonl

    line = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    data = tmp_path / "chat.jsonl.gz"
    data.write_bytes(gzip.compress(((line + "\n") * 2).encode()))
    assert len(list(read_chat_jsonl(data))) == 2
    (tmp_path / "cut.jsonl.gz").write_bytes(data.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: not a readable gzip file"):
        list(read_chat_jsonl(tmp_path / "cut.jsonl.gz"))
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: not a readable gzip file"):  # a folder: its files
        list(read_chat_jsonl(tmp_path))


def test_a_byte_order_mark_before_a_blank_first_line_is_not_invalid_json(tmp_path) -> None:
    """A chat file a Windows editor saved (a byte-order mark, then a blank line) was "chat.jsonl:1: not valid
    JSON"; json.loads skips the mark only in front of a record."""
    from nanoseek.train.sft import read_chat_jsonl

    data = tmp_path / "chat.jsonl"
    data.write_bytes(b"\xef\xbb\xbf\r\n" + _chat_line("q").encode() + b"\r\n")
    assert [m[0]["content"] for m, _ in read_chat_jsonl(data)] == ["q"]


def _chat_line(q: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "a"}]})


def test_chat_data_in_shards_is_one_data_set(tmp_path) -> None:
    """`sft --data` took one file: a data set published in shards (train-00000-of-00002.jsonl, ...), its
    folder or a glob of it was "is a folder" or "does not exist", where `pretrain --data` (and TRL's
    data_files) take them. A folder's dataset card is left out, with a warning; errors name the shard."""
    import gzip

    from nanoseek.train.sft import read_chat_jsonl

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-00000-of-00002.jsonl").write_text(_chat_line("q0") + "\n" + _chat_line("q1") + "\n")
    (shards / "train-00001-of-00002.jsonl.gz").write_bytes(gzip.compress((_chat_line("q2") + "\n").encode()))
    (shards / "README.md").write_text("# a dataset card\n")
    asked = ["q0", "q1", "q2"]
    with pytest.warns(UserWarning, match=r"left out of the data \(README.md\); use .jsonl or .jsonl.gz"):
        assert [m[0]["content"] for m, _ in read_chat_jsonl(shards)] == asked
    assert [m[0]["content"] for m, _ in read_chat_jsonl(str(shards / "train-*"))] == asked
    files = sorted(str(p) for p in shards.glob("train-*"))
    assert [m[0]["content"] for m, _ in read_chat_jsonl(files[::-1])] == ["q2", "q0", "q1"]  # in its order
    named = tmp_path / "chats.json"  # JSON lines under another name, named outright: read as before
    named.write_text(_chat_line("q3") + "\n")
    assert [m[0]["content"] for m, _ in read_chat_jsonl(named)] == ["q3"]
    with pytest.raises(ValueError, match=r"unsupported file type: .*README.md \(use .jsonl or .jsonl.gz\)"):
        list(read_chat_jsonl(str(shards / "*")))
    with pytest.raises(FileNotFoundError, match="no files match"):
        list(read_chat_jsonl(str(shards / "test-*.jsonl")))
    (shards / "train-00001-of-00002.jsonl").write_text(_chat_line("q4") + "\n{not json\n")
    with pytest.raises(ValueError, match=r"train-00001-of-00002.jsonl:2: not valid JSON"):
        list(read_chat_jsonl(str(shards / "*.jsonl")))


def test_chat_data_named_outright_is_read_whatever_its_name_says(tmp_path) -> None:
    """Before `sft --data` took folders it read the file it was given: JSON lines in `chats.txt`, or a
    pipe (`--data <(zcat chats.jsonl.gz)`). They were refused since ("unsupported file type", "data
    source not found" for a pipe that is there), and a run trained on `chats.txt` could not resume: its
    --data renamed is another setting. Same for a `jsonl:` task's file."""
    import os

    from nanoseek.data.tasks import get_task
    from nanoseek.train.sft import read_chat_jsonl

    named = tmp_path / "chats.txt"
    named.write_text(_chat_line("q0") + "\n")
    assert [m[0]["content"] for m, _ in read_chat_jsonl(named)] == ["q0"]
    problems = tmp_path / "problems.txt"
    problems.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    assert [p.prompt for p in get_task(f"jsonl:{problems}").items] == ["1+1?"]
    if not os.path.isdir("/dev/fd"):  # (no /dev/fd: no pipe by name to give)
        return
    read, write = os.pipe()
    os.write(write, (_chat_line("q1") + "\n").encode())
    os.close(write)
    try:
        assert [m[0]["content"] for m, _ in read_chat_jsonl(f"/dev/fd/{read}")] == ["q1"]
    finally:
        os.close(read)


def test_chat_data_in_a_named_pipe_is_read(tmp_path, monkeypatch) -> None:
    """A named pipe (`mkfifo`) as --data: the check that every file can be read opened it and closed it
    again, which let the writer (`cat chats.jsonl > chats`) write into it and end, and the read then
    waited forever for a writer."""
    import os
    import subprocess
    import sys
    import threading

    import nanoseek.data.files
    from nanoseek.train.sft import read_chat_jsonl

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    fifo = tmp_path / "chats"
    os.mkfifo(fifo)
    write = "import sys\nwith open(sys.argv[1], 'wb') as f: f.write(sys.argv[2].encode())"
    writer = subprocess.Popen(
        [sys.executable, "-c", write, str(fifo), _chat_line("q2") + "\n"], stderr=subprocess.DEVNULL
    )
    open_binary = nanoseek.data.files.open_binary

    def open_once_the_writer_could_end(path):  # as `cat` does, before the reader gets there
        with contextlib.suppress(subprocess.TimeoutExpired):
            writer.wait(1)
        return open_binary(path)

    monkeypatch.setattr(nanoseek.data.files, "open_binary", open_once_the_writer_could_end)
    read: list = []
    reader = threading.Thread(target=lambda: read.extend(read_chat_jsonl(fifo)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # waiting for a writer that has gone: one more lets it end
        open(fifo, "wb").close()
        reader.join(10)
    writer.kill()
    writer.wait()
    assert [m[0]["content"] for m, _ in read] == ["q2"]


def test_a_second_sft_into_an_out_in_training_is_refused(micro_checkpoint, tmp_path) -> None:
    """Two `sft --out RUN` at once (two terminals) interleaved their steps in metrics.jsonl and deleted
    each other's scratch checkpoint at their saves: the second is refused before it writes anything."""
    import fcntl

    from nanoseek.train.sft import SFTConfig, sft

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(_chat_line(f"q{i}") + "\n" for i in range(3)))
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".sft.lock", "a+") as held:  # what a running sft holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242")
        held.flush()
        with pytest.raises(ValueError, match=r"run/sft is in use by a running sft \(pid 4242\)"):
            sft(SFTConfig(init=micro_checkpoint, data=str(data), out=str(run), steps=1, progress=False))
    assert sorted(p.name for p in run.iterdir()) == [".sft.lock"]


def test_a_resume_refuses_a_jsonl_task_whose_file_changed(micro_checkpoint, tmp_path) -> None:
    """`--task jsonl:FILE`'s worked solutions: lines added or edited since the run started made other
    examples, and a --resume went on training on them as the same run (--data's files are compared)."""
    from nanoseek.train.sft import SFTConfig, sft

    path = tmp_path / "qa.jsonl"
    row = {"prompt": "1+1?", "answer": 2, "reasoning": "1+1=2", "split": "train"}
    path.write_text(json.dumps(row) + "\n")
    kw = dict(init=micro_checkpoint, task=f"jsonl:{path}", out=str(tmp_path / "run"), progress=False)
    sft(SFTConfig(**kw, steps=1))
    sft(SFTConfig(**kw, steps=2, resume=True))  # the same file: goes on
    with path.open("a") as f:
        f.write(json.dumps({**row, "prompt": "2+2?", "answer": 4, "reasoning": "2+2=4"}) + "\n")
    with pytest.raises(
        ValueError, match=r"the training settings changed \(data_files: .*qa.jsonl \(\d+ bytes\)'\] -> "
    ):
        sft(SFTConfig(**kw, steps=3, resume=True))


def test_sft_trains_on_every_shard_and_a_resume_refuses_a_shard_added_since(
    micro_checkpoint, tmp_path, capsys, monkeypatch
) -> None:
    """A resume compared only --data's text: a glob or folder that found another shard since (or a file
    that grew lines) went on training, on another set of rows, as the same run."""
    from nanoseek.cli import main
    from nanoseek.train import sft as sft_module
    from nanoseek.train.sft import SFTConfig, sft

    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(2):
        (shards / f"part-{k}.jsonl").write_text("".join(_chat_line(f"q{k}{i}") + "\n" for i in range(3)))
    kw = dict(init=micro_checkpoint, data=str(shards / "*.jsonl"), out=str(tmp_path / "run"), progress=False)
    sft(SFTConfig(**kw, steps=1))
    assert "sft: 6 examples" in capsys.readouterr().out
    (shards / "part-2.jsonl").write_text(_chat_line("q20") + "\n")
    with pytest.raises(ValueError, match=r"the training settings changed \(data_files: .*part-2.jsonl"):
        sft(SFTConfig(**kw, steps=2, resume=True))
    (shards / "part-2.jsonl").unlink()
    with (shards / "part-1.jsonl").open("a") as f:  # lines added to a shard: other rows too
        f.write(_chat_line("q13") + "\n")
    with pytest.raises(ValueError, match=r"data_files: .*part-1.jsonl \(\d+ bytes\)'\] -> "):
        sft(SFTConfig(**kw, steps=2, resume=True))
    # several files on the command line are one --data (as pretrain's); one is its text, as before
    got: list = []
    monkeypatch.setattr(sft_module, "sft", got.append)
    one, two = str(shards / "part-0.jsonl"), str(shards / "part-1.jsonl")
    assert main(["sft", "--init", micro_checkpoint, "--data", one, two]) == 0
    assert main(["sft", "--init", micro_checkpoint, "--data", one]) == 0
    assert [c.data for c in got] == [[one, two], one]


def test_a_line_that_is_not_utf8_is_named_by_its_line(tmp_path) -> None:
    # was: UnicodeDecodeError "position 122" of the read buffer, with neither file nor line
    from nanoseek.train.sft import read_chat_jsonl

    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    data = tmp_path / "d.jsonl"
    data.write_bytes(good.encode() + b"\n" + good.replace("q", "\xff").encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=rf"{data}:2: not valid UTF-8"):
        list(read_chat_jsonl(data))


def test_task_conversations_options_with_commas_and_jsonl_without_reasoning(tmp_path):
    from nanoseek.train.sft import task_conversations

    convs = task_conversations("arithmetic?ops=add,sub", 6, seed=0)  # was: unknown task 'sub'
    assert len(convs) == 6
    # --task-examples counts them all, shared between the tasks (5 of 2 tasks: 3 and 2, not 2 and 2)
    prompts = [c[0]["content"] for c in task_conversations("arithmetic?ops=add,sub,countdown", 5, seed=0)]
    countdown = [p for p in prompts if p in {c[0]["content"] for c in task_conversations("countdown", 2)}]
    assert len(prompts) == 5 and len(countdown) == 2
    path = tmp_path / "t.jsonl"
    rows = [{"prompt": "1+1?", "answer": "2", "reasoning": "one and one"}, {"prompt": "2+2?", "answer": "4"}]
    path.write_text("\n".join(json.dumps(dict(r, split="train")) for r in rows) + "\n")
    convs = task_conversations(f"jsonl:{path}", 2, seed=0)  # was: NotImplementedError from the second line
    assert [c[0]["content"] for c in convs] == ["1+1?"]
    code = tmp_path / "code.jsonl"
    code.write_text(json.dumps({"prompt": "p", "tests": "assert True", "split": "train"}) + "\n")
    with pytest.raises(ValueError, match="no worked solutions"):
        task_conversations(f"jsonl:{code}", 2, seed=0)


def test_task_examples_is_at_most_what_a_task_holds(tmp_path):
    """`sft --task jsonl:FILE` under the default --task-examples (2000) trains on every training line of a
    smaller file without a warning about 2000 problems the user never asked for (as GRPO's --train-pool);
    a built-in family with fewer training problems than its share gives all it has, not an error."""
    import warnings

    from nanoseek.train.sft import SFTConfig, task_conversations

    path = tmp_path / "qa.jsonl"
    rows = [
        {"prompt": f"{i}+1?", "answer": i + 1, "reasoning": "add one", "split": "train"} for i in range(5)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        convs = task_conversations(f"jsonl:{path}", SFTConfig.task_examples, seed=0)
        assert sorted(c[0]["content"] for c in convs) == [f"{i}+1?" for i in range(5)]
        assert len(task_conversations("modular", SFTConfig.task_examples, seed=0)) < SFTConfig.task_examples


def test_a_sigterm_saves_the_step_and_the_resume_ends_as_one_run(tmp_path, monkeypatch) -> None:
    """SIGTERM (a job runner's stop) lost every step since the last checkpoint: SFT (and distill, the
    same loop) now saves the step it stopped at, and the resume's losses are those of one run."""
    import os
    import signal
    import time

    from nanoseek.train import TrainingInterrupted, loop
    from nanoseek.train.sft import SFTConfig

    kw = dict(init="", steps=4, batch_size=2, seq_len=32, progress=False)
    whole = [r["loss"] for r in _train_with_budget(tmp_path / "whole", SFTConfig(**kw), time.perf_counter())]
    step = loop.Trainer.step

    def signalled_at_1(self, *args, **kwargs):
        metrics = step(self, *args, **kwargs)
        if self.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    monkeypatch.setattr(loop.Trainer, "step", signalled_at_1)
    with pytest.raises(TrainingInterrupted) as e:
        _train_with_budget(tmp_path / "run", SFTConfig(**kw), time.perf_counter())
    assert (e.value.stage, e.value.step, e.value.exit_code) == ("control", 1, 143)
    monkeypatch.setattr(loop.Trainer, "step", step)
    assert (
        json.loads((tmp_path / "run" / "control" / "train_state" / "trainer.json").read_text())["step"] == 1
    )
    records = _train_with_budget(tmp_path / "run", SFTConfig(**kw, resume=True), time.perf_counter())
    assert [r["loss"] for r in records[-3:]] == whole[1:]


def test_an_out_it_cannot_write_is_refused_before_the_model_loads(tmp_path, monkeypatch) -> None:
    """`sft --out` on a read-only disk (or under a file) was found at the first metrics record, once the
    model had loaded and every conversation was tokenized (minutes, for a large --data)."""
    import nanoseek.checkpoint
    from nanoseek.train.sft import SFTConfig, sft

    (tmp_path / "file").write_text("")
    monkeypatch.setattr(nanoseek.checkpoint, "resolve_checkpoint", lambda *a, **k: pytest.fail("read --init"))
    cfg = SFTConfig(init="ck", task="arithmetic", out=str(tmp_path / "file" / "run"), progress=False)
    with pytest.raises(
        ValueError, match=r"cannot write --out .*run \(.*file: Not a directory\); choose another"
    ):
        sft(cfg)


def test_a_bad_data_line_is_named_before_the_model_loads(micro_checkpoint, tmp_path, monkeypatch) -> None:
    """A bad line of --data (not JSON, no assistant turn) was found only once the model had loaded:
    minutes for a large --init, spent again for every typo fixed."""
    import nanoseek.checkpoint
    from nanoseek.train.sft import SFTConfig, sft

    data = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    monkeypatch.setattr(nanoseek.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    for bad, message in [
        ("{not json", r"chats.jsonl:2: not valid JSON"),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            r"chats.jsonl:2: .*no assistant message",
        ),
    ]:
        data.write_text(json.dumps(good) + "\n" + bad + "\n")
        cfg = SFTConfig(init=micro_checkpoint, data=str(data), out=str(tmp_path / "run"), progress=False)
        with pytest.raises(ValueError, match=message):
            sft(cfg)


@pytest.mark.parametrize("text", ["", "\n\n", "\ufeff"])
def test_an_empty_data_file_is_named(micro_checkpoint, tmp_path, text) -> None:
    """An empty --data file (or one of blank lines, or a byte-order mark alone) ended the run with "no
    training examples", naming no file."""
    from nanoseek.train.sft import SFTConfig, sft

    data = tmp_path / "chats.jsonl"
    data.write_text(text, encoding="utf-8")
    cfg = SFTConfig(init=micro_checkpoint, data=str(data), out=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=r"no chats in \S+chats.jsonl: expected one \{'messages'"):
        sft(cfg)


@pytest.mark.parametrize("indent", [2, None])
def test_chats_saved_as_one_json_array_say_so(tmp_path, indent) -> None:
    """Chats saved as one JSON array (`json.dump(rows)`, a .json export) were "not valid JSON" at its `[`
    (a file json.load reads) or "expected an object", not what --data takes instead: one per line."""
    from nanoseek.train.sft import read_chat_jsonl

    data = tmp_path / "chats.json"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    data.write_text(json.dumps([chat, chat], indent=indent))
    with pytest.raises(
        ValueError, match=r"chats\.json:1: .*; this line opens a JSON array: JSON lines hold one"
    ):
        list(read_chat_jsonl(str(data)))


@pytest.mark.parametrize("arguments", ["{city: Paris", '["Paris"]', '{"t": NaN}', 3])
def test_a_tool_call_whose_arguments_are_no_json_object_is_refused(tmp_path, arguments) -> None:
    """A call's arguments that are not one JSON object were trained on as written: the model learned
    calls the server returns as plain text (`parse_tool_calls`), never as `tool_calls`."""
    from nanoseek.tokenizer import train_tokenizer

    tk = train_tokenizer(["weather in Paris"], vocab_size=300)
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    msgs = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    with pytest.raises(
        ValueError, match=r"chat message 1: tool_calls\[0\]\.function\.arguments is not one JSON"
    ):
        tokenize_conversation(tk, msgs)
    for fine in ('{"city": "Paris"}', {"city": "Paris"}, None):  # an object, as text or not, or none
        call["function"]["arguments"] = fine
        assert tokenize_conversation(tk, msgs)


def test_sft_runs_on_its_threads_gives_them_back_and_writes_tensorboard(
    micro_checkpoint, tmp_path, monkeypatch
):
    """--threads and --tensorboard were pretrain's alone: sft (and distill's student, which trains
    through the same loop) ran on torch's count and wrote no TensorBoard events."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    import nanoseek.train.sft as sft_module
    from nanoseek.train.sft import SFTConfig, sft

    seen = []
    loss = sft_module.sft_loss
    monkeypatch.setattr(sft_module, "sft_loss", lambda *a: seen.append(torch.get_num_threads()) or loss(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = SFTConfig(
            init=micro_checkpoint, task="arithmetic", task_examples=4, steps=2, seq_len=128,
            out=str(tmp_path), progress=False, threads=1, tensorboard=True,
        )  # fmt: skip
        sft(cfg)
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    events = accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "sft"))
    events.Reload()
    assert [e.step for e in events.Scalars("sft/loss")] == [1, 2]


# ------------------------------------------------------------------------------- property tests
_TEXT = st.text(st.sampled_from("ab1 2+=\n.?é中"), max_size=12)
_WORDS = _TEXT.filter(lambda t: t.strip() != "")
_CALL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["add", "look_up"]), "arguments": st.sampled_from(['{"x": 1}', "{}"])}
        ),
    }
)


@st.composite
def _assistant(draw, tools: bool) -> dict:
    """An assistant message in any of the shapes SFT data comes in: reasoning as its own field (DeepSeek's
    name or vLLM's), inline after the prompt's opened think block, in a think block of its own, in both
    a field and the content, or none; tool calls or not."""
    reasoning, answer = draw(_TEXT), draw(_TEXT)
    calls = draw(st.lists(_CALL, max_size=2 if tools else 0))
    if not (answer.strip() or calls or reasoning.strip()):
        answer = "ok"
    shape = draw(st.sampled_from(["field", "inline", "block", "both", "none"]))
    if shape == "field" and reasoning.strip():
        m = {"role": "assistant", "content": answer, "reasoning_content": reasoning}
    elif shape == "both" and reasoning.strip():  # an export that wrote the reasoning back into the content
        m = {
            "role": "assistant",
            "content": f"<think>\n{reasoning}\n</think>\n{answer}",
            "reasoning": reasoning,
        }
    elif shape == "inline":
        m = {"role": "assistant", "content": f"{reasoning}</think>{answer}"}
    elif shape == "block":
        m = {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n{answer}"}
    else:
        reasoning = ""
        if not (answer.strip() or calls):
            answer = "ok"
        m = {"role": "assistant", "content": answer}
    if calls:
        m["tool_calls"] = calls
    if draw(st.integers(0, 4)) == 0:
        m["weight"] = 0
    return {**m, "_reasoning": reasoning, "_answer": answer}


@st.composite
def _conversation(draw, tools: bool = True) -> list[dict]:
    messages: list[dict] = []
    if draw(st.booleans()):
        messages.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(_WORDS)})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(_WORDS)})
        reply = draw(_assistant(tools))
        messages.append(reply)
        while reply.get("tool_calls") and draw(st.booleans()):
            messages += [{"role": "tool", "content": draw(_WORDS)} for _ in range(draw(st.integers(1, 2)))]
            reply = draw(_assistant(tools))
            messages.append(reply)
    return messages


_TOOLS = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in ("add", "look_up")]


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory) -> str:
    from model_configs import chatml_tokenizer

    d = tmp_path_factory.mktemp("chatml")
    chatml_tokenizer(d)
    return str(d)


@settings(max_examples=60)
@given(conv=_conversation(), with_tools=st.booleans())
def test_the_loss_mask_covers_exactly_each_assistant_turn_of_any_chat(
    micro_checkpoint, conv, with_tools
) -> None:
    """Any chat (system prompt, several turns, reasoning in each of its shapes, tool calls and results,
    weight 0 history): one example per trained assistant message, whose untrained tokens are exactly
    the template's prompt up to it and whose trained tokens, read as the server reads a completion,
    are that message's reasoning, answer and tool calls, then one stop token."""
    _check_assistant_turns(micro_checkpoint, conv, _TOOLS if with_tools else None)


@settings(max_examples=40)
@given(conv=_conversation(tools=False))
def test_another_familys_template_trains_each_assistant_turn_of_any_chat(chatml_dir, conv) -> None:
    """The same of a checkpoint with its own template (ChatML, which opens no think block and renders no
    reasoning_content): the template's prompt untrained, the turn's reasoning and answer trained."""
    _check_assistant_turns(chatml_dir, conv, None)


def _check_assistant_turns(directory: str, conv: list[dict], tools: list[dict] | None) -> None:
    from nanoseek.tokenizer import THINK_END, THINK_START, load_tokenizer, openai_message, parse_tool_calls

    tok = load_tokenizer(directory)
    messages = [{k: v for k, v in m.items() if not k.startswith("_")} for m in conv]
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight", 1)]
    if not trained:  # every answer history only: refused, by what it lacks
        with pytest.raises(ValueError, match="no assistant message to train on"):
            tokenize_conversation(tok, messages, tools)
        return
    examples = tokenize_conversation(tok, messages, tools)
    assert len(examples) == len(trained)
    kw = {"tools": tools} if tools else {}
    for (ids, labels), i in zip(examples, trained, strict=True):
        prompt = tok.apply_chat_template(
            [
                {k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning")}
                for m in map(openai_message, messages[:i])
            ],
            add_generation_prompt=True,
            tokenize=True,
            **kw,
        )
        n = len(prompt)
        assert ids[:n] == prompt and labels[:n] == [IGNORE] * n
        target = ids[n:]
        assert labels[n:] == target and target and target[-1] == tok.eos_token_id
        assert not set(tok.stop_token_ids) & set(target[:-1])
        text = tok.decode(target[:-1])
        prompt_text = tok.decode(prompt)
        if not prompt_text.endswith(THINK_START + "\n"):  # after a tool's result: a block of its own, if any
            text = text.removeprefix(THINK_START + "\n") if THINK_END in text else THINK_END + text
        reasoning, _, answer = text.partition(THINK_END)
        m = conv[i]
        assert reasoning.strip() == m["_reasoning"].strip()
        parsed = parse_tool_calls(answer)
        if m.get("tool_calls"):
            assert parsed is not None and parsed[1] == m["tool_calls"]
            answer = parsed[0]
        else:
            assert parsed is None
        assert answer.strip() == m["_answer"].strip()


def test_reasoning_whose_text_the_answer_holds_is_still_trained(micro_checkpoint, tmp_path) -> None:
    """Found by the property above: the turn a template renders was taken for the target when the
    reasoning's text appeared in it anywhere (reasoning "4" in the answer "It is 4.", "1" in a call's
    arguments {"x": 1}): the reasoning was silently left out of the example. After a tool's result with
    R1's template, and with a template that never renders reasoning (ChatML), it is trained in R1's
    think block."""
    from model_configs import chatml_tokenizer
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_checkpoint)
    call = [{"type": "function", "function": {"name": "add", "arguments": '{"x": 1}'}}]
    msgs = [
        {"role": "user", "content": "1"},
        {"role": "assistant", "content": "", "tool_calls": call},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4.", "reasoning_content": "4"},
    ]
    trained = tok.decode([t for t in tokenize_conversation(tok, msgs)[1][1] if t != IGNORE])
    assert trained == "<think>\n4\n</think>\nIt is 4.<｜end▁of▁sentence｜>"
    chatml_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    msgs = [
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "It is 6.", "reasoning_content": "6"},
    ]
    ((_, labels),) = tokenize_conversation(tok, msgs)
    assert tok.decode([t for t in labels if t != IGNORE]) == "<think>\n6\n</think>\nIt is 6.<|im_end|>"


_EXAMPLE = st.lists(st.integers(2, 50), min_size=0, max_size=14).flatmap(
    lambda ids: st.tuples(st.just(ids), st.lists(st.booleans(), min_size=len(ids), max_size=len(ids))).map(
        lambda t: (t[0], [tok if keep else IGNORE for tok, keep in zip(*t, strict=True)])
    )
)


@settings(max_examples=150)
@given(examples=st.lists(_EXAMPLE, max_size=12), seq_len=st.integers(2, 16), pad=st.integers(0, 1))
def test_packing_keeps_every_example_whole_in_one_row_and_trains_its_tokens_once(
    examples, seq_len, pad
) -> None:
    """Any examples, any --seq-len: each (cut to seq_len; one of fewer than 2 tokens has nothing to
    predict) lies whole in one row, its positions from 0, a doc id of its own, its labels but the first
    (never predicted from another example's last token); the rest of a row is padding that trains
    nothing; rows are filled first-fit, longest first; every epoch serves each row once."""
    import random

    rows = pack_examples(examples, seq_len, pad)
    kept = [(ids[:seq_len], labels[:seq_len]) for ids, labels in examples if len(ids) >= 2]
    found = []
    for ids, labels, pos, docs in rows:
        assert len(ids) == len(labels) == len(pos) == len(docs) == seq_len
        n_docs = max(docs) + 1
        assert docs == sorted(docs, key=lambda d: d if d >= 0 else n_docs) and docs[0] == 0
        for d in range(n_docs):
            at = [k for k, x in enumerate(docs) if x == d]
            assert at == list(range(at[0], at[0] + len(at)))
            assert pos[at[0] : at[-1] + 1] == list(range(len(at)))
            found.append((ids[at[0] : at[-1] + 1], labels[at[0] : at[-1] + 1]))
        for k, d in enumerate(docs):
            if d < 0:
                assert ids[k] == pad and labels[k] == IGNORE
    want = sorted((ids, [IGNORE, *labels[1:]]) for ids, labels in kept)
    assert sorted(found) == want
    # first fit, longest first, by a scan of every row per example
    room: list[int] = []
    for n in sorted((len(ids) for ids, _ in kept), reverse=True):
        r = next((r for r, left in enumerate(room) if n <= left), len(room))
        room += [seq_len] * (r == len(room))
        room[r] -= n
    assert [docs.count(-1) for *_, docs in rows] == room
    if rows:
        batch_size, seed = random.Random(seq_len).randint(1, 4), len(examples)
        per_epoch = -(-len(rows) // batch_size)
        for epoch in range(2):
            served = [
                tuple(r)
                for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)
                for r in packed_batch_at(rows, batch_size, seed, step).input_ids.tolist()
            ]
            assert sorted(served) == sorted(tuple(ids) for ids, *_ in rows)
        every = packed_batch_at(rows, len(rows), seed, 0)
        assert every.num_target_tokens == sum(sum(lab != IGNORE for lab in labels[1:]) for _, labels in kept)


@settings(max_examples=15)
@given(
    examples=st.lists(_EXAMPLE, min_size=1, max_size=6),
    seq_len=st.integers(4, 12),
    batch_size=st.integers(1, 3),
)
def test_the_packed_loss_is_each_examples_own_cross_entropy_over_its_targets(
    examples, seq_len, batch_size
) -> None:
    """However examples are packed and batched, the summed loss of every batch of an epoch is the sum
    over the examples, each run alone and cut to --seq-len, of the cross-entropy of each target token
    given the tokens before it in its own example."""
    import torch.nn.functional as F

    model = _small_model()
    kept = [(ids[:seq_len], labels[:seq_len]) for ids, labels in examples if len(ids) >= 2]
    rows = pack_examples(examples, seq_len)
    with torch.no_grad():
        want, count = 0.0, 0
        for ids, labels in kept:
            logits = model(torch.tensor([ids]))[0].float()
            for t in range(1, len(ids)):
                if labels[t] != IGNORE:
                    want += F.cross_entropy(logits[t - 1 : t], torch.tensor([labels[t]])).item()
                    count += 1
        got = 0.0
        for step in range(-(-len(rows) // batch_size) if rows else 0):
            batch = packed_batch_at(rows, batch_size, 0, step)
            n = batch.num_target_tokens
            if n:
                got += sft_loss(model, batch).item() * n
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4) and count == sum(
        sum(lab != IGNORE for lab in labels[1:]) for _, labels in kept
    )


@functools.cache
def _small_model() -> torch.nn.Module:
    """One small model for every example of a property (built once: its weights never change)."""
    from model_configs import small_config
    from nanoseek.checkpoint import build_model

    model = build_model(small_config()).init_weights(0).eval()
    model.set_balance_alpha(0.0)
    return model


def test_a_large_base_fine_tunes_at_a_rate_it_survives():
    """`nanoseek sft --init` a 1.5B base at the speedrun's 3e-4 (the one default) wrecked what it knew in a
    few steps; from 100M parameters the default is open-r1's distillation rate."""
    assert default_lr(6_570_000) == default_lr(99_999_999) == SMALL_MODEL_LR == 3e-4  # the speedrun's
    assert default_lr(100_000_000) == default_lr(1_500_000_000) == LARGE_MODEL_LR == 5e-5
