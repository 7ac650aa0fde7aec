"""`nanoseek generate` and `nanoseek chat` on a tiny random checkpoint with a freshly trained tokenizer."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.test_engine import small_config

from nanoseek.checkpoint import save_model
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model.transformer import DeepSeekV3


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from nanoseek.tokenizer import train_tokenizer

    texts = [
        "the quick brown fox jumps over the lazy dog " * 3,
        "two plus two is four, three times three is nine",
    ] * 20
    tok = train_tokenizer(texts, vocab_size=400)
    cfg = small_config(
        vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
    )
    d = tmp_path_factory.mktemp("ckpt")
    save_model(DeepSeekV3(cfg).init_weights(seed=0), d)
    tok.save(d)
    return d


def cli_args(command: str, *argv: str) -> argparse.Namespace:
    from nanoseek.commands import chat, generate

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    (generate if command == "generate" else chat).register(sub)
    return parser.parse_args([command, *argv])


def test_generate_command(checkpoint, capsys):
    args = cli_args(
        "generate", str(checkpoint), "--prompt", "the quick", "--max-new-tokens", "8", "--threads", "1"
    )
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the quick")
    assert "nanoseek generate:" in captured.err and "tok/s" in captured.err
    args = cli_args("generate", str(checkpoint), "--prompt", "two", "--chat", "--num-samples", "2")
    args.temperature, args.seed, args.max_new_tokens, args.speculative = 1.0, 3, 5, True
    assert args.func(args) == 0
    assert capsys.readouterr().out.count("--- sample") == 2


def test_generate_takes_the_prompt_positionally_or_as_a_flag_but_once(checkpoint, tmp_path, capsys):
    args = cli_args("generate", str(checkpoint), "the quick", "--max-new-tokens", "4", "--threads", "1")
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("the quick")
    args = cli_args("generate", str(checkpoint), "-p", "two", "--max-new-tokens", "2", "--threads", "1")
    assert args.func(args) == 0
    assert capsys.readouterr().out.startswith("two")
    # after the flags too, as users type it (argparse alone would call it unrecognized)
    from nanoseek.cli import main

    assert main(["generate", str(checkpoint), "--max-new-tokens", "2", "--threads", "1", "the quick"]) == 0
    assert capsys.readouterr().out.startswith("the quick")
    with pytest.raises(SystemExit):
        main(["generate", str(checkpoint), "the", "quick"])
    assert "unrecognized arguments: quick" in capsys.readouterr().err
    for threads in ("0", "-2"):  # not silently ignored, not torch's traceback
        assert main(["generate", str(checkpoint), "x", "--threads", threads]) == 2
        assert "--threads must be >= 1" in capsys.readouterr().err
    # a Hub name is not downloaded (all its weights) before the flag is refused
    assert main(["generate", "someone/absent-model", "x", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    # tmp_path holds no checkpoint: the prompt is checked before anything loads
    for extra in (["a", "--prompt", "b"], []):
        args = cli_args("generate", str(tmp_path), *extra)
        with pytest.raises(ValueError, match="give the prompt once"):
            args.func(args)


def test_generate_and_chat_refuse_w8a8_where_it_cannot_run_before_a_hub_download(monkeypatch, capsys):
    """`--quantize w8a8` on a GPU (the default device where there is one), or with a PyTorch without
    its quantized CPU backend, downloaded a Hub model's weights, all of them, before it was refused."""
    import huggingface_hub

    from nanoseek.cli import main
    from nanoseek.engine import quantize

    def fetch(repo_id, **kw):
        raise AssertionError(f"fetched {repo_id} before checking the flags")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for argv in (["generate", "someone/model", "x"], ["chat", "someone/model"]):
        assert main([*argv, "--quantize", "w8a8", "--device", "cuda"]) == 2
        assert "quantize='w8a8' runs on CPUs" in capsys.readouterr().err
    monkeypatch.setattr(quantize, "w8a8_available", lambda: False)  # PyTorch dropped quantized tensors
    assert main(["generate", "someone/model", "x", "--quantize", "w8a8", "--device", "cpu"]) == 2
    assert "quantize='w8a8' needs a PyTorch built with a quantized CPU backend" in capsys.readouterr().err


def test_generate_and_chat_refuse_a_device_this_machine_lacks_before_a_hub_download(monkeypatch, capsys):
    """`--device cuda` on a machine without a GPU (or a typo, `--device cdua`) was said only by the
    weights' load, after a Hub model's whole download."""
    import huggingface_hub

    from nanoseek.cli import main

    def fetch(repo_id, **kw):
        raise AssertionError(f"fetched {repo_id} before checking the flags")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fetch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["generate", "someone/model", "x"], ["chat", "someone/model"]):
        assert main([*argv, "--device", "cuda"]) == 2
        assert "device 'cuda' is not available" in capsys.readouterr().err
        assert main([*argv, "--device", "cdua"]) == 2
        assert "device 'cdua'" in capsys.readouterr().err


def test_generate_refuses_a_prompt_over_the_context_before_echoing_it(checkpoint, capsys):
    from nanoseek.cli import main

    assert main(["generate", str(checkpoint), "word " * 2000, "--max-new-tokens", "2", "--threads", "1"]) == 2
    captured = capsys.readouterr()
    assert "max_seq_len" in captured.err and captured.out == ""


def test_generate_command_errors(tmp_path):
    args = cli_args("generate", str(tmp_path), "--prompt", "x")
    with pytest.raises(FileNotFoundError, match="config.json"):
        args.func(args)


def test_every_command_that_loads_a_checkpoint_takes_the_same_dtypes():
    """serve took --dtype float16 (as load_model does) where generate, chat and eval refused it."""
    from nanoseek.cli import build_parser
    from nanoseek.options import complete

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("serve", "generate", "chat", "eval"):
        (dtype,) = [a for a in complete(commands[name])._actions if a.dest == "dtype"]
        assert tuple(dtype.choices) == ("auto", "float32", "bfloat16", "float16"), name
    args = cli_args("generate", "ck", "x", "--dtype", "float16")
    assert args.dtype == "float16"


def test_generate_refuses_several_greedy_samples_before_loading(tmp_path):
    """`--num-samples 3` at the default --temperature 0 printed the same completion three times, where
    `eval -k 3 --temperature 0` (and vLLM's n > 1) refuse it."""
    for temperature in ("0", "1e-6"):  # the engine (as vLLM) decodes greedily below GREEDY_BELOW
        args = cli_args("generate", str(tmp_path), "the quick", "--num-samples", "3", "--temperature", temperature)  # fmt: skip
        with pytest.raises(ValueError, match="would all be the same one"):
            args.func(args)  # (no checkpoint there: the check comes first)


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_sampling_flags_fail_before_loading_or_echoing(tmp_path, capsys, command):
    # tmp_path holds no checkpoint: reaching the loader would raise FileNotFoundError instead
    extra = ["--prompt", "the quick"] if command == "generate" else []
    args = cli_args(command, str(tmp_path), *extra, "--temperature", "-1")
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        args.func(args)
    assert capsys.readouterr().out == ""


def test_chat_command_history_and_commands(checkpoint):
    from nanoseek.commands import chat

    args = cli_args(
        "chat",
        str(checkpoint),
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--system",
        "be brief",
        "--threads",
        "1",
    )
    stdin = io.StringIO("hello\n/system new rules\n/bogus\nsecond question\n/reset\n/exit\n")
    out = io.StringIO()
    assert chat.run(args, stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    assert "history cleared" in text and "unknown command '/bogus'" in text
    assert "2 turns" in text


def test_chat_turn_splits_reasoning_across_split_tags(checkpoint):
    """`nanoseek chat` streams through the server's ReasoningSplitter: a tag cut across deltas still
    separates the reasoning from the answer, and history keeps both in R1's shape."""
    from nanoseek.commands.chat import chat_turn
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    chunks = ["let me ", "think</th", "ink>\n", "The answer", " is 4"]
    engine = _ScriptedEngine(*(tok.encode(c) for c in chunks))

    out = io.StringIO()
    messages = [{"role": "user", "content": "q"}]
    reply, n = chat_turn(engine, tok, messages, SamplingParams(), out, color=False)
    assert n == sum(len(tok.encode(c)) for c in chunks)
    # without colour (piped) the reasoning is marked by the template's own tags
    assert out.getvalue() == "<think>\nlet me think\n</think>\n\nThe answer is 4\n"
    assert reply == "<think>\nlet me think\n</think>\n\nThe answer is 4"


def test_chat_turn_neither_shows_nor_keeps_the_stop_token(checkpoint):
    """`<｜User｜>` ends a reply (the model starting the next turn) but is not special: it used to be
    printed and kept in history, so the next prompt held a stray user tag."""
    from nanoseek.commands.chat import chat_turn
    from nanoseek.tokenizer import USER, load_tokenizer

    tok = load_tokenizer(checkpoint)
    user = tok.token_to_id(USER)

    engine = _ScriptedEngine(tok.encode("hm</think>The answer is 4"), [user])
    out = io.StringIO()
    params = SamplingParams(stop_token_ids=[tok.eos_token_id, user])
    reply, n = chat_turn(engine, tok, [{"role": "user", "content": "q"}], params, out, color=False)
    assert out.getvalue() == "<think>\nhm\n</think>\n\nThe answer is 4\n"
    assert (
        reply.endswith("</think>\n\nThe answer is 4")
        and n == len(tok.encode("hm</think>The answer is 4")) + 1
    )


def test_chat_turn_closes_a_think_block_the_reply_ended_in(checkpoint):
    """A reply cut off in its reasoning (max tokens, Ctrl-C): piped, the block is still closed."""
    from nanoseek.commands.chat import chat_turn
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)

    engine = _ScriptedEngine(tok.encode("let me think"))

    out = io.StringIO()
    chat_turn(engine, tok, [{"role": "user", "content": "q"}], SamplingParams(), out, color=False)
    assert out.getvalue() == "<think>\nlet me think\n</think>\n"


@given(
    text=st.lists(
        st.sampled_from(["let me", " think", "\n", "\n\n", "<think>", "</think>", "</th", "<", "答え", "é"]),
        max_size=10,
    ).map("".join),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    thinking=st.booleans(),
)
@settings(max_examples=40)
def test_chat_turn_prints_and_keeps_the_same_reply_however_the_engine_steps_it(
    checkpoint, text, cuts, thinking
):
    """Any reply, its tokens given one step or in any cut (empty steps, a tag or a character split between
    steps), with the stop token at the end: the same text printed and kept in history, the reasoning
    and answer of the whole text split at once."""
    from nanoseek.commands.chat import chat_turn
    from nanoseek.serve.textstream import ReasoningSplitter
    from nanoseek.tokenizer import USER, load_tokenizer

    tok = load_tokenizer(checkpoint)
    ids = [*tok.encode(text, add_bos=False), tok.token_to_id(USER)]
    params = SamplingParams(stop_token_ids=[tok.eos_token_id, tok.token_to_id(USER)])
    bounds = [0, *sorted(min(c, len(ids)) for c in cuts), len(ids)]

    def turn(steps: list[list[int]]) -> tuple[str, str, int]:
        out = io.StringIO()
        messages = [{"role": "user", "content": "q"}]
        reply, n = chat_turn(
            _ScriptedEngine(*steps), tok, messages, params, out, color=False, thinking=thinking
        )
        return out.getvalue(), reply, n

    printed, reply, n = turn([ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
    assert (printed, reply, n) == turn([ids])
    assert n == len(ids)
    if thinking:  # R1's template opened <think>
        splitter = ReasoningSplitter(started_in_think=True)
        (r1, c1), (r2, c2) = splitter.push(text), splitter.flush()
        assert reply == f"<think>\n{(r1 + r2).strip()}\n</think>\n\n{(c1 + c2).strip()}"
    else:
        assert (printed, reply) == (text + "\n", text.strip())


def test_a_reply_cut_inside_a_character_ends_before_it_in_chat_and_generate(checkpoint, monkeypatch, capsys):
    """max_new_tokens (or Ctrl-C) ending a reply on the first byte of a character its tokenizer spells in
    bytes (a kanji): `chat` and `generate` printed U+FFFD and `chat` kept it in the history the next
    turn is rendered from; the server, vLLM and ollama end the text before the unfinished character."""
    from nanoseek.commands.chat import chat_turn
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    cut = tok.encode("hm</think>答え", add_bos=False)[:-1]  # え's first byte only
    assert tok.decode(cut).endswith("\ufffd")

    engine = _ScriptedEngine(cut)

    out = io.StringIO()
    reply, _ = chat_turn(engine, tok, [{"role": "user", "content": "q"}], SamplingParams(), out, color=False)
    assert out.getvalue() == "<think>\nhm\n</think>\n\n答\n" and reply.endswith("</think>\n\n答")
    _generate_replies(monkeypatch, tok, cut)
    for samples in ("1", "2"):
        args = cli_args("generate", "ck", "q", "--chat", "--num-samples", samples, "--temperature", "1")
        assert args.func(args) == 0
        assert "\ufffd" not in capsys.readouterr().out


def test_chat_history_of_a_template_without_think_blocks(tmp_path):
    """A ChatML model (Qwen2.5-Instruct) neither opens nor writes a think block: its reply is kept as it
    is, not wrapped in an empty `<think>\\n\\n</think>` that its template would replay every turn."""

    from model_configs import chatml_tokenizer
    from nanoseek.commands.chat import chat_turn
    from nanoseek.tokenizer import load_tokenizer

    chatml_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)

    engine = _ScriptedEngine(*(tok.encode(c) for c in ("Hello", " there")))

    out = io.StringIO()
    reply, _ = chat_turn(engine, tok, [{"role": "user", "content": "hi"}], SamplingParams(), out, color=False)
    assert out.getvalue() == "Hello there\n" and reply == "Hello there"


def test_chat_and_generate_chat_refuse_a_model_whose_tokenizer_has_no_chat_template(
    checkpoint, tmp_path, capsys, monkeypatch
):
    """A base model of another family (no chat template) was sent R1's markup spelled out byte by byte,
    its whole reply shown as reasoning (it never writes </think>); it is refused with what to use."""
    import json
    import shutil

    from model_configs import chatml_tokenizer
    from nanoseek.cli import main

    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, tmp_path / name)
    chatml_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    import nanoseek.checkpoint

    # refused before the weights load, by `chat` and by `generate --chat` (which rendered R1's markup too)
    real_load = nanoseek.checkpoint.load_model
    monkeypatch.setattr(nanoseek.checkpoint, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(tmp_path), "--threads", "1", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "nanoseek generate" in err
    assert main(["generate", str(tmp_path), "hi", "--chat", "--threads", "1", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "without --chat" in err
    monkeypatch.setattr(nanoseek.checkpoint, "load_model", real_load)
    assert main(["generate", str(tmp_path), "hi", "--threads", "1", "--max-new-tokens", "2"]) == 0


def test_chat_no_think_refuses_a_template_without_a_non_thinking_mode(checkpoint, tmp_path):
    """R1-Distill's template opens the think block whatever `thinking` says: `--no-think` ("the reply is
    only the answer") showed the model's reasoning and its </think> as the answer; it is refused."""
    import json
    import shutil

    from nanoseek.commands import chat

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (  # R1-Distill's generation prompt, as it ships
        "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}<｜Assistant｜><think>\n"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    args = cli_args("chat", str(tmp_path), "--no-think", "--max-new-tokens", "2", "--threads", "1")
    with pytest.raises(ValueError, match="no non-thinking mode"):
        chat.run(args, stdin=io.StringIO("hi\n"), stdout=io.StringIO())
    args = cli_args("chat", str(tmp_path), "--max-new-tokens", "2", "--threads", "1")  # thinking: as before
    assert chat.run(args, stdin=io.StringIO("hi\n"), stdout=io.StringIO()) == 0
    # `eval --no-think` scored the reasoning and its </think> as the answer: refused before the weights load
    from nanoseek.evaluate import CheckpointSampler, EvalConfig

    cfg = EvalConfig(model=str(tmp_path), task="arithmetic", thinking=False, progress=False)
    with pytest.raises(ValueError, match="--no-think: .* no non-thinking mode"):
        CheckpointSampler(cfg)
    assert CheckpointSampler(dataclasses.replace(cfg, thinking=True)).opens_think


def test_chat_no_think(checkpoint):
    """`--no-think`: the prompt closes the think block (DeepSeek-V3.1's non-thinking mode) and the whole
    reply is the answer, stray tags included; history keeps it as it is."""
    from types import SimpleNamespace

    from nanoseek.commands import chat
    from nanoseek.commands.chat import chat_turn
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    prompts = []

    class Engine:
        max_seq_len = 4096

        def stream(self, prompts_, params, should_stop=None):
            prompts.append(prompts_[0])
            return [SimpleNamespace(new_token_ids=tok.encode(c)) for c in ("The answer", " is 4</think>")]

    out = io.StringIO()
    reply, _ = chat_turn(
        Engine(), tok, [{"role": "user", "content": "q"}], SamplingParams(), out, False, thinking=False
    )
    assert tok.decode(prompts[0]).endswith("<｜Assistant｜></think>")
    assert out.getvalue() == "The answer is 4</think>\n" and reply == "The answer is 4</think>"

    args = cli_args("chat", str(checkpoint), "--no-think", "--max-new-tokens", "4", "--threads", "1")
    assert args.think is False and cli_args("chat", str(checkpoint)).think is True
    out = io.StringIO()
    assert chat.run(args, stdin=io.StringIO("hello\n"), stdout=out) == 0
    assert "1 turn," in out.getvalue()


@pytest.mark.parametrize("env", [{}, {"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_chat_dims_the_reasoning_only_on_a_terminal_that_asks_for_it(checkpoint, monkeypatch, env):
    """On a terminal the reasoning is dimmed with ANSI escapes, but not under NO_COLOR (no-color.org) or
    TERM=dumb (whose terminal prints them as text), as `nanoseek inspect`'s rich table honours them."""
    from nanoseek.commands import chat

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = cli_args("chat", str(checkpoint), "--max-new-tokens", "4", "--threads", "1")
    out = Terminal()
    assert chat.run(args, stdin=io.StringIO("hello\n"), stdout=out) == 0
    assert ("\x1b[2m" in out.getvalue()) == (not env)


def test_chat_banner_counts_the_checkpoints_weights_whatever_their_storage(checkpoint):
    """int8 weights are buffers, packed ones opaque tensors: the banner counts from the config."""
    import nanoseek
    from nanoseek.commands import chat

    model = nanoseek.load_model(checkpoint)
    full = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for name, p in model.named_parameters() if ".mtp_layers." in name)
    args = cli_args("chat", str(checkpoint), "--quantize", "int8", "--max-new-tokens", "2", "--threads", "1")
    out = io.StringIO()
    assert chat.run(args, stdin=io.StringIO("/exit\n"), stdout=out) == 0
    from nanoseek.accounting import human

    shown = f"({human(full - mtp)} params + {human(mtp)} in the MTP module, float32)"
    assert shown in out.getvalue(), out.getvalue()[:200]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_generate_and_chat_load_a_bf16_checkpoint_in_bf16_only_where_the_cpu_runs_it(
    checkpoint, tmp_path, monkeypatch, capsys, native_bf16
):
    """`--dtype auto` (the default): the checkpoint's own 16 bits where the CPU multiplies bf16
    natively, fp32 where it does not; an fp32 checkpoint stays fp32; a flag overrides."""
    from model_configs import bf16_copy
    from nanoseek.commands import chat
    from nanoseek.commands.generate import load_for_generation

    bf16 = bf16_copy(checkpoint, tmp_path / "bf16")
    monkeypatch.setattr("nanoseek.perf.cpu_has_bf16", lambda: native_bf16)
    want = torch.bfloat16 if native_bf16 else torch.float32
    assert load_for_generation(cli_args("generate", str(bf16), "--prompt", "x"))[2].dtype == want
    assert (
        load_for_generation(cli_args("generate", str(checkpoint), "--prompt", "x"))[2].dtype == torch.float32
    )
    forced = cli_args("generate", str(bf16), "--prompt", "x", "--dtype", "float32")
    assert load_for_generation(forced)[2].dtype == torch.float32
    args = cli_args("generate", str(bf16), "--prompt", "the quick", "--max-new-tokens", "2", "--threads", "1")
    assert args.func(args) == 0
    assert f"tok/s, {str(want).removeprefix('torch.')}" in capsys.readouterr().err
    out = io.StringIO()
    args = cli_args("chat", str(bf16), "--max-new-tokens", "2", "--threads", "1")
    assert chat.run(args, stdin=io.StringIO("/exit\n"), stdout=out) == 0
    assert f" in the MTP module, {str(want).removeprefix('torch.')})" in out.getvalue()


def test_chat_ctrl_c_stops_the_reply_and_keeps_the_session(checkpoint, monkeypatch):
    """Ctrl-C (SIGINT) while a reply streams ends that reply, aborts its engine request and returns to the
    prompt with the history kept; it used to raise KeyboardInterrupt out of the whole session."""
    import os
    import signal

    from nanoseek.commands import chat

    real_load = chat.load_for_generation
    seen = {}

    def load(args, chat=False):
        engine, tok, model = real_load(args, chat=chat)

        class Interrupting:  # the real engine; SIGINT arrives while the first reply streams
            max_seq_len = engine.max_seq_len

            def stream(self, prompts, params, should_stop=None):
                seen.setdefault("turns", 0)
                seen["turns"] += 1
                for i, ev in enumerate(engine.stream(prompts, params)):
                    if seen["turns"] == 1 and i == 2:
                        os.kill(os.getpid(), signal.SIGINT)
                    yield ev

        seen["engine"] = engine
        return Interrupting(), tok, model

    monkeypatch.setattr(chat, "load_for_generation", load)
    args = cli_args("chat", str(checkpoint), "--max-new-tokens", "40", "--temperature", "1", "--threads", "1")
    out = io.StringIO()
    previous = signal.getsignal(signal.SIGINT)
    try:
        rc = chat.run(args, stdin=io.StringIO("first\nsecond\n"), stdout=out)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during a reply ended the chat session")
    assert rc == 0
    text = out.getvalue()
    assert "(stopped)" in text and "2 turns" in text
    assert not seen["engine"].has_unfinished()  # the interrupted request was aborted
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is only set while a reply streams


def test_chat_says_when_a_message_does_not_fit_and_goes_on(checkpoint):
    # only a prompt over the context is "does not fit"; other errors are not reported as that
    from nanoseek.commands import chat

    args = cli_args("chat", str(checkpoint), "--max-new-tokens", "4", "--temperature", "0", "--threads", "1")
    stdin = io.StringIO("word " * 2000 + "\nhello\n/exit\n")
    out = io.StringIO()
    assert chat.run(args, stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    assert "the context holds" in text and "try a shorter message" in text and "1 turn," in text


class _ScriptedEngine:
    """An engine whose stream gives these token-id chunks, one a step: `chat_turn` without a model."""

    max_seq_len = 4096

    def __init__(self, *chunks: list[int]) -> None:
        self.chunks = chunks

    def stream(self, prompts, params, should_stop=None):
        from types import SimpleNamespace

        return [SimpleNamespace(new_token_ids=list(c)) for c in self.chunks]


def _generate_replies(monkeypatch, tok, reply: list[int], finish_reason: str = "stop") -> list:
    """`nanoseek generate` answers `reply` to every prompt, without a model, ended for `finish_reason`;
    returns the sampling params each call was given."""
    import types

    from nanoseek.commands import generate

    seen = []

    class Scripted:
        dtype = "torch.float32"
        max_seq_len = 256

        def stream(self, prompts, params, should_stop=None):
            seen.append(params)
            yield types.SimpleNamespace(new_token_ids=reply, finished=True, finish_reason=finish_reason)

        def generate_detailed(self, prompts, params):
            seen.append(params)
            return [types.SimpleNamespace(token_ids=reply, finish_reason=finish_reason) for _ in prompts]

        def stats(self):
            return {"spec_acceptance_rate": None}

    monkeypatch.setattr(
        generate, "load_for_generation", lambda args, max_batch_size=1: (Scripted(), tok, None)
    )
    return seen


def test_generate_keeps_the_first_words_space_with_a_sentencepiece_vocabulary(tmp_path, monkeypatch, capsys):
    """A Llama-2-style decoder strips a text's leading space: the completion decoded alone printed
    "The capital isParis."; decoded after the prompt (as serve and vLLM do), " Paris."."""
    from model_configs import sentencepiece_tokenizer

    tok = sentencepiece_tokenizer(tmp_path)
    _generate_replies(monkeypatch, tok, [tok.token_to_id("▁Paris"), tok.token_to_id(".")])
    for samples in ("1", "2"):
        args = cli_args("generate", "ck", "The capital is", "--num-samples", samples, "--temperature", "1")
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert "The capital is Paris." in out and "isParis" not in out


def test_generate_reads_a_prompt_file_on_stdin_without_its_bom_crlf_or_last_line_end(
    checkpoint, monkeypatch, capsys
):
    """`generate DIR - < prompt.txt`: a Windows editor's byte-order mark and CRLF line ends went into the
    prompt as tokens, and so did the file's (or `echo`'s) last newline: the model continued the text on
    a new line."""
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    _generate_replies(monkeypatch, tok, tok.encode(" fox", add_bos=False))
    monkeypatch.setattr(sys, "stdin", io.StringIO("\ufeffthe\r\nquick\r\n"))
    args = cli_args("generate", "ck", "-")
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert captured.out == "the\nquick fox\n"
    n = len(tok.encode("the\nquick", add_bos=tok.add_bos_token))
    assert f"from a {n}-token prompt" in captured.err


def test_generate_says_when_the_context_ended_a_completion_before_max_new_tokens(
    checkpoint, monkeypatch, capsys
):
    """A prompt near the context's end with --max-new-tokens past it: the completion stopped at the
    context without a word, and read as the model's own end (a server refuses such a request)."""
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    reply = tok.encode(" fox", add_bos=False)
    for reason, said in (("length", True), ("stop", False)):
        _generate_replies(monkeypatch, tok, reply, finish_reason=reason)
        for samples in ("1", "2"):
            args = cli_args("generate", "ck", "the quick", "--max-new-tokens", "50", "--num-samples", samples, "--temperature", "1")  # fmt: skip
            assert args.func(args) == 0
            err = capsys.readouterr().err
            assert ("stopped at the context's end (256 tokens" in err) == said
            assert ("2 of 2 completions" in err) == (said and samples == "2")
    _generate_replies(monkeypatch, tok, reply, finish_reason="length")  # --max-new-tokens itself ended it
    args = cli_args("generate", "ck", "the quick", "--max-new-tokens", str(len(reply)))
    assert args.func(args) == 0
    assert "context" not in capsys.readouterr().err


def test_chat_session_sends_the_history_and_flags_the_user_relies_on(checkpoint, monkeypatch):
    """What `nanoseek chat` asks of the engine, seen from a scripted one: the system prompt (as /system
    sets it, stripped), every earlier turn of the session, the defaults --help documents (1024 tokens at
    temperature 0.6), the user tag as a stop; --no-think closes the think block; /quit ends the session;
    the summary counts every token generated."""
    from types import SimpleNamespace

    from nanoseek.commands import chat
    from nanoseek.config import get_preset
    from nanoseek.tokenizer import USER, load_tokenizer

    tok = load_tokenizer(checkpoint)
    reply = tok.encode("hm</think>ok", add_bos=False)
    seen = []

    class Scripted:
        max_seq_len = 4096

        def stream(self, prompts, params, should_stop=None):
            seen.append((tok.decode(prompts[0]), params))
            return [SimpleNamespace(new_token_ids=reply)]

    model = SimpleNamespace(config=get_preset("tiny"), dtype=torch.float32)
    monkeypatch.setattr(chat, "load_for_generation", lambda args, chat=False: (Scripted(), tok, model))
    stdin = io.StringIO("first\n/system   new rules\nsecond\nthird\n/quit\nnever sent\n")
    out = io.StringIO()
    assert chat.run(cli_args("chat", str(checkpoint), "--system", "be brief"), stdin=stdin, stdout=out) == 0
    prompts = [p for p, _ in seen]
    assert len(prompts) == 3 and "be brief<｜User｜>first<｜Assistant｜><think>\n" in prompts[0]
    assert "first" not in prompts[1] and "sentence｜>new rules<｜User｜>second<｜Assistant｜>" in prompts[1]
    assert "new rules<｜User｜>second<｜Assistant｜>ok<｜end▁of▁sentence｜><｜User｜>third" in prompts[2]
    params = seen[0][1]
    assert (params.max_new_tokens, params.temperature) == (1024, 0.6)
    assert tok.token_to_id(USER) in params.stop_token_ids and tok.eos_token_id in params.stop_token_ids
    assert f"3 turns, {3 * len(reply)} tokens" in out.getvalue()
    seen.clear()
    args = cli_args("chat", str(checkpoint), "--no-think")
    assert chat.run(args, stdin=io.StringIO("q\n"), stdout=io.StringIO()) == 0
    assert seen[0][0].endswith("<｜User｜>q<｜Assistant｜></think>")


def test_chat_reads_messages_piped_in_without_their_byte_order_mark(checkpoint, monkeypatch):
    """`Get-Content questions.txt | nanoseek chat CK` (PowerShell), or a file a Windows editor saved: the
    byte-order mark opened the first message, as text the model was sent, and hid a command there
    ("\ufeff/system" was a message). `generate -` drops it already, by the same function."""
    from types import SimpleNamespace

    from nanoseek.commands import chat
    from nanoseek.config import get_preset
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    seen = []

    class Scripted:
        max_seq_len = 4096

        def stream(self, prompts, params, should_stop=None):
            seen.append(tok.decode(prompts[0]))
            return [SimpleNamespace(new_token_ids=tok.encode("ok", add_bos=False))]

    model = SimpleNamespace(config=get_preset("tiny"), dtype=torch.float32)
    monkeypatch.setattr(chat, "load_for_generation", lambda args, chat=False: (Scripted(), tok, model))
    stdin = io.StringIO("\ufeff/system be brief\nfirst\n\ufeffsecond\n")  # two files, a mark each
    assert chat.run(cli_args("chat", str(checkpoint)), stdin=stdin, stdout=io.StringIO()) == 0
    assert len(seen) == 2 and "\ufeff" not in "".join(seen)
    assert (
        "be brief<｜User｜>first<｜Assistant｜>" in seen[0] and "<｜User｜>second<｜Assistant｜>" in seen[1]
    )


def test_chat_no_color_flag_is_plain_text_on_a_terminal(checkpoint):
    from nanoseek.commands import chat

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    # seeded: a sample whose first token closed the think block showed no `<think>` (1 run in 30)
    args = cli_args(
        "chat", str(checkpoint), "--no-color", "--max-new-tokens", "4", "--threads", "1", "--seed", "0"
    )
    out = Terminal()
    assert chat.run(args, stdin=io.StringIO("hello\n"), stdout=out) == 0
    assert "\x1b[" not in out.getvalue() and "<think>" in out.getvalue()


def test_chat_with_stdout_redirected_writes_the_replies_alone_there(checkpoint, capsys):
    """`nanoseek chat CK < questions > answers` wrote the banner, a "> " before each reply (the question
    itself is not echoed, so the reply read as the user's line) and the summary into the answers; as
    `ollama run` and `generate` do, stdout now gets the replies and stderr the rest."""
    from nanoseek.commands import chat

    args = cli_args(
        "chat", str(checkpoint), "--no-think", "--max-new-tokens", "4", "--temperature", "0", "--threads", "1"
    )
    assert chat.run(args, stdin=io.StringIO("hello\n/help\n/bogus\nagain\n")) == 0
    captured = capsys.readouterr()
    assert "nanoseek chat:" not in captured.out and "> " not in captured.out
    assert "commands:" not in captured.out and "unknown command" not in captured.out
    assert captured.out.strip()  # the replies
    assert captured.err.startswith("nanoseek chat:") and "2 turns" in captured.err
    assert "unknown command '/bogus'" in captured.err and "\n> " in captured.err


def test_chat_with_a_system_prompt_says_a_first_message_too_long_needs_shortening(checkpoint):
    # the history holds only the system prompt: /reset would not help
    from nanoseek.commands import chat

    args = cli_args(
        "chat", str(checkpoint), "--system", "be brief", "--max-new-tokens", "2", "--threads", "1"
    )
    out = io.StringIO()
    assert chat.run(args, stdin=io.StringIO("word " * 2000 + "\n"), stdout=out) == 0
    assert "the context holds" in out.getvalue() and ": try a shorter message)" in out.getvalue()


@pytest.mark.parametrize(("flags", "match"), [
    (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    (["--num-samples", "-1"], "--num-samples must be >= 1, got -1"),
    (["--num-samples", "2", "--temperature", "0"], "the --num-samples 2 samples of the prompt would all be the same one"),
])  # fmt: skip
def test_generate_refuses_a_sample_count_before_loading(tmp_path, flags, match):
    args = cli_args("generate", str(tmp_path), "x", *flags)  # tmp_path holds no checkpoint
    with pytest.raises(ValueError, match=match):
        args.func(args)


def test_generate_and_chat_defaults_are_those_help_documents():
    from nanoseek.commands.generate import sampling_params

    said = "(default: the checkpoint's generation_config.json, else"
    assert f"{said} 256)" in " ".join(_help("generate").split())
    assert f"{said} 1024)" in " ".join(_help("chat").split())
    assert f"{said} 0.6)" in " ".join(_help("chat").split())
    generate, chat = sampling_params(cli_args("generate", "ck", "x")), sampling_params(cli_args("chat", "ck"))
    assert (generate.max_new_tokens, generate.temperature, generate.top_p) == (256, 0.0, 1.0)
    assert (chat.max_new_tokens, chat.temperature, chat.top_p) == (1024, 0.6, 1.0)


def _with_generation_config(checkpoint, tmp_path, gen: dict):
    """A copy of `checkpoint` whose generation_config.json is `gen`."""
    import json
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(checkpoint, d)
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


def test_generate_and_chat_sample_with_the_checkpoints_generation_config_where_a_flag_is_left_out(
    checkpoint, tmp_path, monkeypatch
):
    """A flag left out takes the checkpoint's generation_config.json value, as `serve` does for a request
    that leaves the field out, and a flag given wins: chat sampled at 0.6 a model whose file says
    `do_sample: false` (its server decodes it greedily) and dropped a Qwen model's top_k and penalty,
    and both ignored the file's max_new_tokens (transformers' generate and vLLM's server stop there)."""
    from types import SimpleNamespace

    from nanoseek.commands import chat
    from nanoseek.config import get_preset
    from nanoseek.tokenizer import load_tokenizer

    qwen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    tok = load_tokenizer(_with_generation_config(checkpoint, tmp_path, {**qwen, "max_new_tokens": 7}))
    seen = _generate_replies(monkeypatch, tok, tok.encode(" fox", add_bos=False))
    for flags in ([], ["--top-k", "5", "--temperature", "0", "--max-new-tokens", "300"]):
        args = cli_args("generate", "ck", "the quick", *flags)
        assert args.func(args) == 0
    p = seen[0]
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens) == (
        0.7,
        0.8,
        20,
        1.05,
        7,
    )
    p = seen[1]
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_new_tokens) == (
        0.0,
        0.8,
        5,
        1.05,
        300,
    )

    gen = {"do_sample": False, "max_new_tokens": 11}
    greedy = load_tokenizer(_with_generation_config(checkpoint, tmp_path / "g", gen))
    asked = []

    class Scripted:
        max_seq_len = 4096

        def stream(self, prompts, params, should_stop=None):
            asked.append(params)
            return [SimpleNamespace(new_token_ids=greedy.encode("ok", add_bos=False))]

    model = SimpleNamespace(config=get_preset("tiny"), dtype=torch.float32)
    monkeypatch.setattr(chat, "load_for_generation", lambda args, chat=False: (Scripted(), greedy, model))
    for flags in ([], ["--temperature", "0.9", "--max-new-tokens", "2000"]):
        assert chat.run(cli_args("chat", "ck", *flags), stdin=io.StringIO("q\n"), stdout=io.StringIO()) == 0
    assert [(p.temperature, p.max_new_tokens) for p in asked] == [(0.0, 11), (0.9, 2000)]


def test_generate_refuses_several_samples_of_a_checkpoint_that_decodes_greedily_before_its_weights_load(
    checkpoint, tmp_path, monkeypatch
):
    from nanoseek.commands import generate

    d = _with_generation_config(checkpoint, tmp_path, {"do_sample": False})
    monkeypatch.setattr("nanoseek.checkpoint.load_model", lambda *a, **k: pytest.fail("weights loaded"))
    args = cli_args("generate", str(d), "x", "--num-samples", "2")
    with pytest.raises(ValueError, match="would all be the same one"):
        args.func(args)
    (d / "generation_config.json").write_text('{"top_p": 5}')
    with pytest.raises(ValueError, match="generation_config.json: invalid SamplingParams: top_p"):
        generate.load_for_generation(cli_args("generate", str(d), "x"))
    with pytest.raises(pytest.fail.Exception, match="weights loaded"):  # --top-p given: the file's is unused
        generate.load_for_generation(cli_args("generate", str(d), "x", "--top-p", "0.5"))


def _help(command: str) -> str:
    from nanoseek.cli import build_parser
    from nanoseek.options import complete

    return complete(build_parser()._subparsers._group_actions[0].choices[command]).format_help()


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_threads_hold_for_the_command_and_the_callers_count_comes_back(checkpoint, monkeypatch, command):
    """--threads through `perf.torch_threads`, as every other command sets it: generate and chat set
    torch's count with code of their own, which left it changed in the caller's process (a notebook's)
    after the command had returned."""
    import nanoseek.checkpoint
    from nanoseek.cli import main

    seen, real = [], nanoseek.checkpoint.load_model
    monkeypatch.setattr(
        nanoseek.checkpoint,
        "load_model",
        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k),
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("/exit\n"))
    torch.set_num_threads(2)
    argv = [str(checkpoint), *(["x"] if command == "generate" else []), "--max-new-tokens", "1"]
    assert main([command, *argv, "--threads", "1"]) == 0
    assert seen == [1] and torch.get_num_threads() == 2


def test_generate_flags_reach_the_load_and_the_prompt(checkpoint, monkeypatch, capsys):
    """--device is the device asked for (not the default), the BOS the tokenizer asks for is in the
    prompt (the stderr summary counts it), and '-' reads the prompt from stdin; several samples are
    numbered 1/N..N/N."""
    from nanoseek.cli import main
    from nanoseek.tokenizer import load_tokenizer

    assert main(["generate", str(checkpoint), "x", "--device", "nonesuch"]) == 2
    assert "device 'nonesuch'" in capsys.readouterr().err
    tok = load_tokenizer(checkpoint)
    n = len(tok.encode("the quick", add_bos=tok.add_bos_token))
    assert tok.add_bos_token and n == len(tok.encode("the quick", add_bos=False)) + 1
    monkeypatch.setattr("sys.stdin", io.StringIO("the quick"))
    assert main(["generate", str(checkpoint), "-", "--max-new-tokens", "2", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("the quick") and f"from a {n}-token prompt" in captured.err
    argv = [
        "generate",
        str(checkpoint),
        "x",
        "--num-samples",
        "2",
        "--temperature",
        "1",
        "--max-new-tokens",
        "1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "--- sample 1/2\n" in out and "--- sample 2/2\n" in out


def test_speculative_on_a_checkpoint_without_mtp_says_so_and_decodes_plainly(checkpoint, tmp_path, capsys):
    from nanoseek.commands.generate import load_for_generation
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    cfg = small_config(
        vocab_size=tok.vocab_size,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        num_nextn_predict_layers=0,
    )
    save_model(DeepSeekV3(cfg).init_weights(seed=0), tmp_path)
    tok.save(tmp_path)
    engine, _, _ = load_for_generation(cli_args("generate", str(tmp_path), "x", "--speculative"))
    assert engine.speculative is False
    assert "has no MTP module; decoding without speculation" in capsys.readouterr().err
    engine, _, _ = load_for_generation(cli_args("generate", str(checkpoint), "x", "--speculative"))
    assert engine.speculative is True
    # not asked, nothing is said of a module no one wanted
    engine, _, _ = load_for_generation(cli_args("generate", str(tmp_path), "x"))
    assert engine.speculative is False and "MTP" not in capsys.readouterr().err


def test_the_checkpoints_sampling_defaults_are_those_of_the_flags_left_out() -> None:
    """A file's `do_sample: false` stands for temperature 0; with --temperature given, the notice of the
    defaults taken from the file ("sampling defaults from generation_config.json: ...") named
    temperature=0.0 all the same, a value the run did not use. Only max_new_tokens, left out, is taken."""
    from nanoseek.commands.generate import file_sampling_defaults

    gen = {"do_sample": False, "max_new_tokens": 11}
    assert file_sampling_defaults(cli_args("generate", "ck", "x", "--temperature", "0.5"), gen) == {
        "max_new_tokens": 11
    }
    assert file_sampling_defaults(cli_args("generate", "ck", "x"), gen) == {
        "temperature": 0.0,
        "max_new_tokens": 11,
    }


def test_chat_turn_refuses_a_conversation_that_fills_the_context(checkpoint):
    """As the engine refuses a prompt of max_seq_len tokens (no room for one more), the turn says the
    conversation does not fit, so the session goes on instead of ending on the engine's error."""
    from nanoseek.commands.chat import ContextFull, chat_turn
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    messages = [{"role": "user", "content": "q"}]
    n = len(tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))

    class Engine:
        max_seq_len = n

        def stream(self, prompts, params, should_stop=None):
            pytest.fail("a prompt that fills the context reached the engine")

    with pytest.raises(ContextFull, match=f"the message is {n} tokens; the context holds {n}"):
        chat_turn(Engine(), tok, messages, SamplingParams(), io.StringIO(), color=False)


def test_generate_stops_at_the_tokenizers_stop_ids_and_a_chat_sample_is_the_reply_alone(
    checkpoint, monkeypatch, capsys
):
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    seen = _generate_replies(monkeypatch, tok, tok.encode(" fox", add_bos=False))
    for samples in ("1", "2"):
        args = cli_args(
            "generate", "ck", "the quick", "--chat", "--num-samples", samples, "--temperature", "1"
        )
        assert args.func(args) == 0
        out = capsys.readouterr().out
        assert "the quick" not in out and " fox" in out
    assert [p.stop_token_ids for p in seen] == [list(tok.stop_token_ids)] * 2 and tok.stop_token_ids


def _scripted_chat(monkeypatch, checkpoint, max_seq_len: int = 4096) -> list[str]:
    """`nanoseek chat` answers "ok" to every turn, without a model; returns each turn's prompt text."""
    from types import SimpleNamespace

    from nanoseek.commands import chat
    from nanoseek.config import get_preset
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    reply = tok.encode("hm</think>ok", add_bos=False)
    prompts: list[str] = []

    class Scripted:
        def stream(self, ids, params, should_stop=None):
            assert len(ids[0]) < self.max_seq_len
            prompts.append(tok.decode(ids[0]))
            return [SimpleNamespace(new_token_ids=reply)]

    Scripted.max_seq_len = max_seq_len
    model = SimpleNamespace(config=get_preset("tiny"), dtype=torch.float32)
    monkeypatch.setattr(chat, "load_for_generation", lambda args, chat=False: (Scripted(), tok, model))
    return prompts


def test_chat_drops_the_oldest_turns_when_the_context_fills_and_goes_on(checkpoint, monkeypatch):
    """A conversation that outgrew the context was refused message after message until /reset lost it
    all; as ollama's and llama.cpp's chats, the oldest whole exchanges leave the model's view (never the
    system prompt, never the new message), a line says how many, and room is kept for the answer
    (--max-new-tokens). A message too long even alone is refused with the sizes, the history kept."""
    from nanoseek.commands import chat
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    reply = "<think>\nhm\n</think>\n\nok"

    def size(*users: str) -> int:
        msgs = [{"role": "system", "content": "be brief"}]
        for u in users:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": reply}]
        text = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=False)
        return len(tok.encode(text))

    # the third message fits only with the first exchange dropped and 4 tokens left for the answer
    ctx = size("first", "second", "third") + 4 - 1
    assert size("second", "third") + 4 <= ctx
    prompts = _scripted_chat(monkeypatch, checkpoint, max_seq_len=ctx)
    long = "word " * 300
    stdin = io.StringIO(f"first\nsecond\nthird\n{long}\nfourth\n")
    out = io.StringIO()
    args = cli_args("chat", str(checkpoint), "--system", "be brief", "--max-new-tokens", "4")
    assert chat.run(args, stdin=stdin, stdout=out) == 0
    text = out.getvalue()
    assert len(prompts) == 4 and "first" in prompts[1]
    assert "first" not in prompts[2] and "be brief<｜User｜>second<｜Assistant｜>ok" in prompts[2]
    assert prompts[2].endswith("<｜User｜>third<｜Assistant｜><think>\n")
    assert "(context full: 1 earlier turn dropped from the model's view)" in text
    n = len(tok.encode(tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": long.strip()}], tokenize=False
    )))  # fmt: skip
    assert f"(the message and the system prompt are {n} tokens; the context holds {ctx}" in text
    assert "/reset" not in text.split("\n", 1)[1]  # the history is no help: it goes by itself
    assert "third<｜Assistant｜>ok" in prompts[3] and prompts[3].endswith("fourth<｜Assistant｜><think>\n")
    assert "4 turns" in text


def test_chat_keeps_room_for_the_answer_of_at_most_half_the_context(checkpoint):
    """--max-new-tokens past the context (chat's 1024 by default, a 256-token model) still leaves half of
    the context to the conversation; a smaller one leaves the rest."""
    from nanoseek.commands.chat import fit_context
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": "ok"}]
    history.append({"role": "user", "content": "last"})
    for wanted, room in ((1024, 128), (100, 100), (4, 4)):
        messages = list(history)
        text, ids, dropped = fit_context(tok, messages, 256, wanted)
        assert len(ids) + room <= 256 and dropped and messages == history[2 * dropped :]
        bigger = tok.apply_chat_template(history[2 * dropped - 2 :], tokenize=False)
        assert len(tok.encode(bigger)) + room > 256  # no more was dropped than needed


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # a UTF-8 locale's stdin; C.UTF-8's
def test_chat_reads_bytes_that_are_not_utf8_as_replacement_characters(checkpoint, monkeypatch, errors):
    """A Latin-1 "été" typed or piped in ended the whole session (exit 2: a UnicodeDecodeError, or the
    tokenizer's lone-surrogate error), with the turns before it lost; ollama's client sends U+FFFD."""
    from nanoseek.commands import chat

    prompts = _scripted_chat(monkeypatch, checkpoint)
    stdin = io.TextIOWrapper(io.BytesIO(b"first\n\xe9t\xe9\nthird\n"), encoding="utf-8", errors=errors)
    out = io.StringIO()
    assert chat.run(cli_args("chat", str(checkpoint)), stdin=stdin, stdout=out) == 0
    assert len(prompts) == 3 and "<｜User｜>\ufffdt\ufffd<｜Assistant｜>" in prompts[1]
    assert "3 turns" in out.getvalue()


def test_chat_system_command_is_the_word_not_a_prefix(checkpoint, monkeypatch):
    """The line "/systemd ..." set the system prompt to "d ..." and cleared the conversation; it is an
    unknown command, and the history and system prompt stay."""
    from nanoseek.commands import chat

    prompts = _scripted_chat(monkeypatch, checkpoint)
    stdin = io.StringIO("first\n/systemd starts what?\nsecond\n/system\tnew rules\nthird\n")
    out = io.StringIO()
    assert chat.run(cli_args("chat", str(checkpoint), "--system", "be brief"), stdin=stdin, stdout=out) == 0
    assert "unknown command '/systemd'" in out.getvalue()
    out = io.StringIO()
    assert chat.run(cli_args("chat", str(checkpoint)), stdin=io.StringIO("/help\n/?\n"), stdout=out) == 0
    assert out.getvalue().count("commands: /reset") == 3 and "unknown" not in out.getvalue()  # banner too
    assert "be brief<｜User｜>first<｜Assistant｜>ok" in prompts[1] and "d starts" not in prompts[1]
    assert "new rules<｜User｜>third<｜Assistant｜>" in prompts[2] and "first" not in prompts[2]


def test_chat_commands_are_read_by_their_word_as_ollama_reads_them(checkpoint, monkeypatch):
    """ "/reset now", "/help me" or "/exit please" said "unknown command '/reset'" (the whole line was
    matched), a command the help itself lists; the word is the command, as ollama reads "/bye ..."."""
    from nanoseek.commands import chat

    prompts = _scripted_chat(monkeypatch, checkpoint)
    stdin = io.StringIO("first\n/reset all of it\nsecond\n/help me\n/exit please\nnever sent\n")
    out = io.StringIO()
    assert chat.run(cli_args("chat", str(checkpoint)), stdin=stdin, stdout=out) == 0
    assert "unknown" not in out.getvalue() and "(history cleared)" in out.getvalue()
    assert len(prompts) == 2 and "first" not in prompts[1]  # reset, then the session ended at /exit
    assert out.getvalue().count("commands: /reset") == 2  # the banner and /help


def test_chat_takes_a_message_of_several_lines_between_triple_quotes(checkpoint, monkeypatch):
    """Pasted code or a table was one message per line (ollama reads the lines between triple quotes
    as one); an unclosed block ends with the input."""
    from nanoseek.commands import chat

    prompts = _scripted_chat(monkeypatch, checkpoint)
    stdin = io.StringIO('"""Fix this:\n  def f(x):\n    return x +\n"""\n"""one line"""\nafter\n"""open\nend')
    out = io.StringIO()
    assert chat.run(cli_args("chat", str(checkpoint)), stdin=stdin, stdout=out) == 0
    assert "<｜User｜>Fix this:\n  def f(x):\n    return x +<｜Assistant｜>" in prompts[0]
    assert (
        "<｜User｜>one line<｜Assistant｜>" in prompts[1] and "<｜User｜>after<｜Assistant｜>" in prompts[2]
    )
    assert prompts[3].endswith("<｜User｜>open\nend<｜Assistant｜><think>\n") and "4 turns" in out.getvalue()


def test_chat_reads_a_triple_quoted_block_as_a_message_even_where_it_opens_with_a_slash(
    checkpoint, monkeypatch
):
    """Pasted code opens with a comment ("// ...") or a path as often as not: the block was taken for an
    unknown command and dropped, and one whose text was "/exit" ended the session. ollama sends a
    block's text as the message, whatever it holds; a command is a line of its own."""
    from nanoseek.commands import chat

    prompts = _scripted_chat(monkeypatch, checkpoint)
    stdin = io.StringIO('"""\n// add two numbers\nint add(int a, int b);\n"""\n"""/exit"""\n/exit\nnever\n')
    out = io.StringIO()
    assert chat.run(cli_args("chat", str(checkpoint)), stdin=stdin, stdout=out) == 0
    assert "unknown command" not in out.getvalue() and len(prompts) == 2
    assert "<｜User｜>// add two numbers\nint add(int a, int b);<｜Assistant｜>" in prompts[0]
    assert "<｜User｜>/exit<｜Assistant｜>" in prompts[1]


@pytest.mark.skipif(
    importlib.util.find_spec("readline") is None or sys.platform == "win32", reason="needs a pty and readline"
)
def test_chat_on_a_terminal_reads_a_line_longer_than_the_terminals_own(checkpoint):
    """On a terminal the kernel's line editing keeps 4095 characters of a line and drops the rest without
    a word, so a long pasted message reached the model cut; read through readline (as ollama's and
    llama-cli's raw-mode editors read it), all of it arrives. The 256-token context refuses it, and the
    refusal counts the tokens that arrived."""
    import os
    import pty
    import select
    import subprocess

    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    text = "two " * 1500  # 6000 characters
    n = len(tok.encode(tok.apply_chat_template([{"role": "user", "content": text.strip()}])))
    primary, secondary = pty.openpty()
    cmd = [sys.executable, "-m", "nanoseek", "chat", str(checkpoint), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    seen = b""

    def read_until(needle: bytes) -> None:
        nonlocal seen
        while needle not in seen:
            ready, _, _ = select.select([primary], [], [], 60)
            assert ready, f"no {needle!r} from the chat; it wrote {seen[-300:]!r}"
            seen += os.read(primary, 65536)

    try:
        read_until(b"\n> ")
        data = text.encode() + b"\r"
        for i in range(0, len(data), 512):  # read the echo meanwhile: a full pty would block both sides
            os.write(primary, data[i : i + 512])
            ready, _, _ = select.select([primary], [], [], 0.05)
            if ready:
                seen += os.read(primary, 65536)
        read_until(b"message)\r\n\r\n> ")  # the refusal, then the next prompt
        os.write(primary, b"\x04")  # Ctrl-D at an empty prompt ends the session
        read_until(b"0 turns")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(primary)
    assert f"the message is {n} tokens".encode() in seen


def test_generate_and_chat_refuse_a_tokenizer_larger_than_the_models_vocabulary(checkpoint, tmp_path, capsys):
    """Another model's tokenizer.json (or a config.json edited down) loaded without complaint: the engine
    refused a prompt only when it used an id past the model's rows, and sampling never made them. Said
    before the weights load, naming both files; a vocabulary padded past the tokenizer (DeepSeek's,
    Qwen's) is normal."""
    import shutil

    from nanoseek.cli import main
    from nanoseek.commands.generate import load_for_generation
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    for name, vocab_size in (("small", tok.vocab_size - 100), ("padded", tok.vocab_size + 48)):
        cfg = small_config(
            vocab_size=vocab_size, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id
        )
        save_model(DeepSeekV3(cfg).init_weights(seed=0), tmp_path / name)
        tok.save(tmp_path / name)
    small = tmp_path / "small"
    (small / "model.safetensors").write_bytes(b"\0" * 100)  # never read: the check comes first
    assert main(["generate", str(small), "the", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert f"tokenizer.json has {tok.vocab_size} tokens" in err and str(small / "config.json") in err
    assert f"vocab_size ({small / 'config.json'}) is {tok.vocab_size - 100}" in err
    with pytest.raises(ValueError, match="tokenizer the model was trained with"):
        load_for_generation(cli_args("chat", str(small)))
    shutil.rmtree(small)
    assert main(["generate", str(tmp_path / "padded"), "the", "--max-new-tokens", "2"]) == 0


def test_chat_drops_nothing_when_the_prompt_and_the_answers_room_fill_the_context_exactly(checkpoint):
    """The history is trimmed only where prompt + room for the answer exceeds the context: a prompt of
    n tokens with room r in a context of exactly n + r tokens keeps every exchange."""
    from nanoseek.commands.chat import fit_context
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second"},
    ]
    n = len(tok.encode(tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)))
    messages = list(history)
    _, ids, dropped = fit_context(tok, messages, n + 4, 4)  # room = min(4, (n + 4) // 2) = 4
    assert (len(ids), dropped, messages) == (n, 0, history)
    messages = list(history)
    _, _, dropped = fit_context(tok, messages, n + 3, 4)  # one token short: the first exchange goes
    assert dropped == 1 and messages == history[2:]


def test_chat_turn_shows_the_end_of_a_reply_the_splitter_still_held(checkpoint):
    """Reasoning ending in what could begin "</think>" ("hm <" is held back until the next text says
    whether the tag follows) is shown and kept whole when the reply ends there (max tokens, Ctrl-C)."""
    from nanoseek.commands.chat import chat_turn
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)

    engine = _ScriptedEngine(tok.encode("hm <", add_bos=False))

    out = io.StringIO()
    reply, _ = chat_turn(engine, tok, [{"role": "user", "content": "q"}], SamplingParams(), out, color=False)
    assert out.getvalue() == "<think>\nhm <\n</think>\n"
    assert reply == "<think>\nhm <\n</think>\n\n"


def test_chat_turn_keeps_the_answer_without_its_surrounding_whitespace(checkpoint):
    """Blank lines the model writes after its answer (before its end token) are shown but not kept in the
    history the next turn is rendered from."""
    from nanoseek.commands.chat import chat_turn
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)

    engine = _ScriptedEngine(tok.encode("hm</think>ok  \n\n", add_bos=False))

    out = io.StringIO()
    reply, _ = chat_turn(engine, tok, [{"role": "user", "content": "q"}], SamplingParams(), out, color=False)
    assert reply == "<think>\nhm\n</think>\n\nok"


def test_chat_turn_without_thinking_shows_a_stray_think_tag_as_answer(checkpoint):
    """--no-think: the reply is all answer, so a "<think>" the model writes is printed as it is (as the
    server does), not dimmed away as reasoning."""
    from nanoseek.commands.chat import chat_turn
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)

    engine = _ScriptedEngine(tok.encode("<think>a</think>b", add_bos=False))

    out = io.StringIO()
    messages = [{"role": "user", "content": "q"}]
    reply, _ = chat_turn(engine, tok, messages, SamplingParams(), out, color=False, thinking=False)
    assert out.getvalue() == "<think>a</think>b\n"


def test_chat_turn_in_colour_dims_the_reasoning_without_printing_its_tags(checkpoint):
    """On a terminal the reasoning is marked by dimming alone: no "<think>" opening it, no "</think>"
    closing it, the answer set apart by a blank line."""

    from nanoseek.commands.chat import DIM, RESET, chat_turn
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(checkpoint)

    engine = _ScriptedEngine(tok.encode("hm</think>ok", add_bos=False))

    out = io.StringIO()
    chat_turn(engine, tok, [{"role": "user", "content": "q"}], SamplingParams(), out, color=True)
    assert out.getvalue() == f"{DIM}hm{RESET}\n\nok\n"


def test_chat_reads_a_triple_quoted_block_with_spaces_around_its_quotes():
    """Pasted text often carries indentation: a block opened by '  \"\"\"' and closed by '\"\"\"  ' is one
    message, not two lines sent one by one."""
    from nanoseek.commands.chat import _read_message

    stdin = io.StringIO('  """first\nsecond"""  \nafter\n')
    out = io.StringIO()
    assert _read_message(stdin, out, terminal=False) == ("first\nsecond", True)
    assert _read_message(stdin, out, terminal=False) == ("after", False)


def test_chat_session_skips_blank_lines_and_says_stopped_only_for_a_stopped_reply(checkpoint, monkeypatch):
    """An empty line is not a message (no turn is generated for it), and "(stopped)" is said only
    after a reply Ctrl-C stopped, never after one that ended by itself."""
    from nanoseek.commands import chat

    prompts = _scripted_chat(monkeypatch, checkpoint)
    out = io.StringIO()
    args = cli_args("chat", str(checkpoint), "--max-new-tokens", "4")
    assert chat.run(args, stdin=io.StringIO("\n   \nhello\n"), stdout=out) == 0
    assert len(prompts) == 1 and "(stopped)" not in out.getvalue()
    assert "1 turn," in out.getvalue()


def test_chat_system_command_without_text_clears_the_system_prompt(checkpoint, monkeypatch):
    """ "/system" alone clears the system prompt (as it says): the next turn's prompt has none."""
    from nanoseek.commands import chat

    prompts = _scripted_chat(monkeypatch, checkpoint)
    out = io.StringIO()
    args = cli_args("chat", str(checkpoint), "--system", "be brief", "--max-new-tokens", "4")
    assert chat.run(args, stdin=io.StringIO("one\n/system\ntwo\n"), stdout=out) == 0
    assert "be brief" in prompts[0] and "be brief" not in prompts[1]
    assert "(system prompt cleared; history cleared)" in out.getvalue()


def test_a_second_ctrl_c_while_a_reply_streams_ends_the_chat():
    """The first Ctrl-C only asks the reply to stop; a second one raises KeyboardInterrupt (the program
    ends, as before); the handler is put back afterwards."""
    import os
    import signal

    from nanoseek.commands.chat import _ctrl_c_stops_reply

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), _ctrl_c_stops_reply() as stopped:
        assert not stopped()
        os.kill(os.getpid(), signal.SIGINT)
        assert stopped()
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
