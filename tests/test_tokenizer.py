"""Tokenizer: lossless round trips, DeepSeek special tokens, R1 chat template (ours == transformers'),
HF loading, incremental decoding, CLI."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nanoseek.tokenizer import (
    _UNICODE_TO_BYTE,
    ASSISTANT,
    BOS,
    CHAT_TOKENS,
    EOS,
    PAD,
    R1_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    THINK_END,
    THINK_START,
    TOOL_CALL_END,
    TOOL_SEP,
    TOOL_TOKENS,
    USER,
    IncrementalDecoder,
    Tokenizer,
    llama_cpp_pre_tokenizer,
    load_tokenizer,
    render_chat,
    train_tokenizer,
)

SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 12:45, and x = 3.14159!\n\n\tIndented  twice.",
    "japanese": "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。カタカナもＯＫ、全角数字１２３。",
    "chinese": "我们的答案是四十二。先计算 17 × 3 = 51，再减去 9 得到 42。",
    "emoji": "👩‍👩‍👧‍👦 family, 🇯🇵 flag, skin 👍🏽, ✨ sparkles ✨ and 😀😀😀",
    "mixed": "<think>\n計算: 2+2=4</think> The answer is 4.<｜end▁of▁sentence｜>  trailing spaces   \r\n",
}


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    base = list(SAMPLES.values())
    out = []
    for i in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        out.append(f"{rng.choice(base)} Problem {i}: {a} + {b} = {a + b}. 答えは{a + b}です。")
    return out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(_corpus(), vocab_size=600)


@pytest.fixture(scope="module")
def hf(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """`tok` saved and loaded by transformers (`AutoTokenizer`), its chat template and all."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("hf")
    tok.save(directory)
    return AutoTokenizer.from_pretrained(str(directory))


# Property tests' text: any characters (no lone surrogates: not text), mixed with what tends to break
# tokenizers: the markup's own strings, CRLF, NUL, a lone combining mark, ZWJ emoji, unseen characters.
MARKUP = (*SPECIAL_TOKENS, *CHAT_TOKENS, *TOOL_TOKENS)
_chars = st.characters(blacklist_categories=("Cs",))
_tricky = ["\r\n", "\x00", "\u0301", "👩\u200d👩\u200d👧", "日本語", "🦀", " ", "\n\n", "<｜", "｜>", "12345"]
_texts = st.lists(st.text(_chars, max_size=8) | st.sampled_from([*MARKUP, *_tricky]), max_size=8).map("".join)


def _random_text(rng: random.Random, n: int) -> str:
    chars = []
    for _ in range(n):
        plane = rng.random()
        if plane < 0.4:
            cp = rng.randint(0x20, 0x7E)
        elif plane < 0.7:
            cp = rng.randint(0x80, 0xFFFF)
        else:
            cp = rng.randint(0x10000, 0x10FFFF)
        if 0xD800 <= cp <= 0xDFFF:  # surrogates are not characters
            cp = 0x20
        chars.append(chr(cp))
    return "".join(chars)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_scripts(tok: Tokenizer, name: str) -> None:
    text = SAMPLES[name]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Byte-level: the tokens' bytes are exactly the text's UTF-8 bytes, in order.
    table = tok.token_bytes()
    assert b"".join(table[i] for i in ids) == text.encode("utf-8")


def test_round_trip_random_code_points_and_bytes(tok: Tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(50):
        text = _random_text(rng, rng.randint(1, 80))
        assert tok.decode(tok.encode(text)) == text
    for _ in range(50):  # arbitrary bytes, as text arrives from a file read with errors="replace"
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 120)))
        text = raw.decode("utf-8", errors="replace")
        assert tok.decode(tok.encode(text)) == text
    for text in ["", " ", "\n", "\x00\x01\x7f", "\ufeffBOM", "a\u0301 e\u0301", "ﬁ ligature", "Ⅻ"]:
        assert tok.decode(tok.encode(text)) == text  # no normalizer: NFC/NFKC forms are left alone


@settings(max_examples=150)
@given(text=_texts, markup=st.sampled_from(MARKUP))
def test_any_text_round_trips_and_encodes_as_transformers_encodes_it(
    tok: Tokenizer, hf, text: str, markup: str
) -> None:
    """decode(encode(text)) == text for any text (CRLF, NUL, a lone combining mark, ZWJ emoji, characters
    the corpus never had), spelled in exactly its UTF-8 bytes; transformers reading the saved files
    encodes and decodes it the same."""
    ids = tok.encode(text)
    assert tok.decode(ids) == text == hf.decode(ids)
    assert b"".join(tok.token_bytes()[i] for i in ids) == text.encode("utf-8")
    assert hf(text)["input_ids"] == tok.encode(text, add_bos=True)
    assert tok.encode_batch([text, text + "x"]) == [ids, tok.encode(text + "x")]
    # Text that spells a markup token is that token, as in DeepSeek's tokenizer and transformers: the
    # template's own markup is text too (render_chat returns a string). Only BOS, EOS and PAD are
    # special: skip_special_tokens drops them from user text as well.
    spelled = tok.encode(text + markup + text)
    assert tok.token_to_id(markup) in spelled
    dropped = re.sub("|".join(map(re.escape, SPECIAL_TOKENS)), "", text + markup + text)
    assert (
        tok.decode(spelled, skip_special_tokens=True)
        == dropped
        == hf.decode(spelled, skip_special_tokens=True)
    )


def test_digits_are_single_tokens(tok: Tokenizer) -> None:
    for text in ["1234567890", "x=31415", " 2026年11月23日 +1000"]:
        ids = tok.encode(text)
        digits = [c for c in text if c.isdigit()]
        pieces = [tok.decode([i]) for i in ids]
        assert [p for p in pieces if any(c.isdigit() for c in p)] == digits
    # Non-ASCII digits are isolated too (then spelled in bytes unless the corpus had them).
    pre = tok.backend.pre_tokenizer.pre_tokenize_str("١٢٣")
    assert len(pre) == 3


def test_pre_tokenizer_is_one_llama_cpp_knows(tok: Tokenizer, tmp_path: Path) -> None:
    """The split is Qwen2's, which llama.cpp applies by name: a GGUF export tokenizes the same there."""
    assert llama_cpp_pre_tokenizer(tok) == "qwen2"
    # llama.cpp applies its own copy of Qwen2's regex for "qwen2" (never the file's), so ours must be
    # that regex to the letter, as Qwen2's tokenizer.json writes it: a contraction of any case is its
    # own piece ("'S" then "up"), where a case-sensitive one left "'Sup" whole
    assert SPLIT_PATTERN == (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    tok.save(tmp_path / "new")
    assert llama_cpp_pre_tokenizer(load_tokenizer(tmp_path / "new")) == "qwen2"
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("答えは42です。Hello世界 x+1")]
    # Letters of any script stay together (one mark or space may lead them, as in GPT-4's regex);
    # every digit is its own piece.
    decoded = [bytes(_UNICODE_TO_BYTE[c] for c in p).decode() for p in pieces]
    assert decoded == ["答えは", "4", "2", "です", "。Hello世界", " x", "+", "1"]
    # A tokenizer trained before the switch (its own CJK-run regex) is not one llama.cpp knows.
    spec = json.loads(tok.backend.to_str())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"[\p{Han}]+|\p{N}|\s+"
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer.json").write_text(json.dumps(spec))
    old = load_tokenizer(tmp_path / "old")
    assert llama_cpp_pre_tokenizer(old) is None
    assert old.decode(old.encode("日本 42")) == "日本 42"  # still loads and works as before


def test_llama_cpp_pre_tokenizer_names_only_the_exact_pipeline(tok: Tokenizer) -> None:
    """llama.cpp's "qwen2" is a normalizer-free byte-level BPE split by the regex, pieces kept whole:
    any other step (a normalizer, a third pre-tokenizer, another split behaviour, an inverted split,
    a prefix space, ByteLevel's own GPT-2 regex) tokenizes differently there, so it has no name."""
    from types import SimpleNamespace

    spec = json.loads(tok.backend.to_str())

    def name(edit) -> str | None:  # noqa: ANN001
        changed = json.loads(json.dumps(spec))
        edit(changed)
        return llama_cpp_pre_tokenizer(
            SimpleNamespace(backend=SimpleNamespace(to_str=lambda: json.dumps(changed)))
        )

    split = lambda s: s["pre_tokenizer"]["pretokenizers"][0]  # noqa: E731
    byte_level = lambda s: s["pre_tokenizer"]["pretokenizers"][1]  # noqa: E731
    assert name(lambda s: None) == "qwen2"
    edits = {
        "NFC normalizer": lambda s: s.update(normalizer={"type": "NFC"}),
        "Unigram model": lambda s: s["model"].update(type="Unigram"),
        "third step": lambda s: s["pre_tokenizer"]["pretokenizers"].append({"type": "Digits"}),
        "merged split": lambda s: split(s).update(behavior="MergedWithPrevious"),
        "inverted split": lambda s: split(s).update(invert=True),
        "prefix space": lambda s: byte_level(s).update(add_prefix_space=True),
        "GPT-2 regex too": lambda s: byte_level(s).update(use_regex=True),
    }
    for what, edit in edits.items():
        assert name(edit) is None, what


def test_special_tokens_are_single_ids(tok: Tokenizer) -> None:
    for t in (BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END):
        assert len(tok.encode(t)) == 1, t
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    assert tok.encode("hi", add_bos=True) == [tok.bos_token_id, *tok.encode("hi")]
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok.vocab_size <= 600
    text = f"{BOS}<think>\nr</think>a{EOS}{PAD}"
    # Special tokens vanish under skip_special_tokens; the chat / think tags stay (as in DeepSeek-R1).
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "<think>\nr</think>a"
    assert tok.encode_batch(["a b", "日本"], add_bos=True) == [
        tok.encode("a b", add_bos=True),
        tok.encode("日本", add_bos=True),
    ]


def test_tool_markup_survives_decoding_without_special_tokens(tok: Tokenizer) -> None:
    """The tool-call tokens are single ids kept in decoded text (special=false, as in DeepSeek-V3's
    tokenizer.json): the server decodes a completion with skip_special_tokens and then parses its calls,
    which would vanish if the trainer marked them special."""
    from nanoseek.tokenizer import TOOL_TOKENS, parse_tool_calls, render_tool_calls

    assert all(len(tok.encode(t)) == 1 for t in TOOL_TOKENS)
    assert not tok.special_token_ids & {tok.token_to_id(t) for t in TOOL_TOKENS}
    calls = [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    ids = tok.encode("ok" + render_tool_calls(calls) + EOS)
    dec = tok.incremental_decoder(skip_special_tokens=True)
    streamed = "".join(dec.push(i) for i in ids) + dec.flush()
    assert streamed == tok.decode(ids, skip_special_tokens=True) == "ok" + render_tool_calls(calls)
    assert parse_tool_calls(streamed) == ("ok", calls)


def test_vocab_size_is_exact() -> None:
    rng = random.Random(3)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)]
    tok = train_tokenizer(texts, vocab_size=700)
    assert tok.vocab_size == 700 and max(tok.backend.get_vocab().values()) == 699


def test_training_runs_off_the_main_thread_so_ctrl_c_lands(monkeypatch: pytest.MonkeyPatch) -> None:
    """BPE training runs in Rust, which checks no signals: on the main thread a Ctrl-C on a large corpus
    waited for training to end (30 s on 58 MB). It runs on a worker thread the main thread waits for;
    its errors still reach the caller."""
    import threading

    import nanoseek.tokenizer as tokenizer_module

    build, threads = tokenizer_module._build_backend, []

    class Recording:
        def __init__(self) -> None:
            self.backend = build()

        def train_from_iterator(self, texts, trainer):
            threads.append(threading.current_thread())
            texts = list(texts)  # (handed on as an iterator)
            if texts == ["fail"]:
                raise RuntimeError("trainer failed")
            return self.backend.train_from_iterator(texts, trainer=trainer)

        def __getattr__(self, name: str):
            return getattr(self.backend, name)

    monkeypatch.setattr(tokenizer_module, "_build_backend", Recording)
    tok = train_tokenizer(["the cat sat on the mat"] * 50, vocab_size=300)
    assert tok.decode(tok.encode("the cat")) == "the cat"
    assert threads and threads[0] is not threading.main_thread()
    with pytest.raises(RuntimeError, match="trainer failed"):
        train_tokenizer(["fail"], vocab_size=300)


def test_training_cuts_a_long_run_without_spaces_so_it_cannot_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    """BPE training time grows faster than linearly in a split piece's length: a file of 2M letters with
    no space or digit (a genome, base64) stalled training. The trainer sees such a run cut into
    pieces of `_TRAIN_PIECE_CHARS`; ordinary text reaches it unchanged."""
    from tokenizers import Regex, pre_tokenizers

    import nanoseek.tokenizer as tokenizer_module

    build, seen = tokenizer_module._build_backend, []

    class Recording:
        def __init__(self) -> None:
            self.backend = build()

        def train_from_iterator(self, texts, trainer):
            seen.extend(texts)
            return self.backend.train_from_iterator(seen, trainer=trainer)

        def __getattr__(self, name: str):
            return getattr(self.backend, name)

    monkeypatch.setattr(tokenizer_module, "_build_backend", Recording)
    limit = tokenizer_module._TRAIN_PIECE_CHARS
    ordinary = "the cat sat on the mat, 12 times"
    genome = "read: " + "GATTACA" * (limit // 2) + "\n" + " " * (2 * limit) + "+-" * limit + " end"
    tok = train_tokenizer([ordinary, genome], vocab_size=300, min_frequency=1)
    assert seen[0] == ordinary and "".join(seen[1:]) == genome  # nothing lost, nothing added
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    assert max(len(piece) for text in seen for piece, _ in split.pre_tokenize_str(text)) <= limit
    assert tok.decode(tok.encode(genome)) == genome


def _longest_piece(texts: list[str]) -> int:
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    return max((end - start for text in texts for _, (start, end) in split.pre_tokenize_str(text)), default=0)


_runs = st.sampled_from(["a", " ", "!", "\n", "日", "1", "\r\n", " a", "+-"])
_long_texts = st.lists(
    st.text(_chars, max_size=5) | st.tuples(_runs, st.integers(0, 2200)).map(lambda r: r[0] * r[1]),
    max_size=5,
).map("".join)


@settings(max_examples=60)
@given(text=_long_texts)
def test_training_sees_any_text_whole_in_pieces_no_longer_than_the_limit(text: str) -> None:
    from nanoseek.tokenizer import _TRAIN_PIECE_CHARS, _cut_long_pieces

    seen = list(_cut_long_pieces([text]))
    assert "".join(seen) == text
    assert _longest_piece(seen) <= _TRAIN_PIECE_CHARS


def test_training_cuts_a_long_piece_of_symbols_then_newlines() -> None:
    """The shrunk case of the property above: one piece of 5 symbols and 499 CRLFs (1003 characters) went
    to the trainer whole, the quick test looking for a run of blanks or of non-blanks as long as the limit."""
    from nanoseek.tokenizer import _TRAIN_PIECE_CHARS, _cut_long_pieces

    text = "!!!!!" + "\r\n" * 499
    assert _longest_piece([text]) == 1003
    assert _longest_piece(list(_cut_long_pieces([text]))) <= _TRAIN_PIECE_CHARS


@settings(max_examples=40)
@given(
    corpus=st.lists(_texts, max_size=6),
    vocab_size=st.integers(277, 400),
    min_frequency=st.integers(0, 3),
    probes=st.lists(_texts, max_size=3),
)
def test_a_tokenizer_trained_on_any_texts_loads_back_encoding_the_same(
    tmp_path_factory: pytest.TempPathFactory,
    corpus: list[str],
    vocab_size: int,
    min_frequency: int,
    probes: list[str],
) -> None:
    """train_tokenizer on any texts (markup spelled in them, CRLF, emoji, none at all): at most vocab_size
    ids, the markup single ids, and what it saves loads back, saves again the same, and encodes and
    decodes every text as the trained one does."""
    trained = train_tokenizer(corpus, vocab_size=vocab_size, min_frequency=min_frequency)
    assert trained.vocab_size <= vocab_size
    assert all(len(trained.encode(t)) == 1 for t in MARKUP)
    saved = trained.save(tmp_path_factory.mktemp("trained"))
    again = load_tokenizer(saved)
    resaved = again.save(tmp_path_factory.mktemp("resaved"))  # what it loaded, saved again: the same files
    assert all(
        (saved / f).read_bytes() == (resaved / f).read_bytes()
        for f in ("tokenizer.json", "tokenizer_config.json")
    )
    assert again.vocab_size == trained.vocab_size and llama_cpp_pre_tokenizer(again) == "qwen2"
    assert again.special_token_ids == trained.special_token_ids
    ends = (again.bos_token_id, again.eos_token_id, again.pad_token_id, again.chat_template)
    assert ends == (trained.bos_token_id, trained.eos_token_id, trained.pad_token_id, R1_CHAT_TEMPLATE)
    for text in [*corpus, *probes]:
        ids = trained.encode(text)
        assert again.encode(text) == ids and trained.decode(ids) == text == again.decode(ids)


def test_train_rejects_tiny_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency must be 0 or more"):  # was an OverflowError
        train_tokenizer(["abc"], vocab_size=300, min_frequency=-1)
    assert train_tokenizer(["abc abc"], vocab_size=300, min_frequency=0).decode([]) == ""  # 0 is allowed


# ------------------------------------------------------------------ chat template
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are helpful."},
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "日本の首都は？"},
        {"role": "assistant", "content": "<think>\nTokyo is the capital.\n</think>\n東京です。"},
        {"role": "user", "content": "And China's?"},
    ],
    [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "no think tags", "reasoning_content": "ignored"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": None},
    ],
    [{"role": "system", "content": "only a system prompt"}],
]


def test_r1_chat_format(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(CONVERSATIONS[1])
    assert text == (
        f"{BOS}You are helpful.\n\nAnswer briefly.{USER}日本の首都は？{ASSISTANT}東京です。{EOS}"
        f"{USER}And China's?{ASSISTANT}<think>\n"
    )
    no_prompt = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False)
    assert no_prompt == f"{BOS}{USER}What is 2+2?"
    ids = tok.apply_chat_template(CONVERSATIONS[0], tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids[-2:] == [tok.think_start_id, tok.encode("\n")[0]]
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        render_chat([{"role": "user", "content": ["parts"]}])


def test_apply_chat_template_return_type_follows_tokenize() -> None:
    """A user's mypy must see str for tokenize=False and list[int] for tokenize=True (it saw
    `str | list[int]` for both, so `engine.generate([ids])` failed to type-check)."""
    import typing
    from typing import Literal

    hints = [typing.get_type_hints(f) for f in typing.get_overloads(Tokenizer.apply_chat_template)]
    returns = {h["tokenize"]: h["return"] for h in hints}
    assert returns[Literal[False]] is str and returns[Literal[True]] == list[int]


def test_saved_tokenizer_works_in_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == R1_CHAT_TEMPLATE and config["bos_token"] == BOS
    assert config["add_bos_token"] is True
    # transformers 4.x honours it and strips the spaces before punctuation ("a , b" -> "a, b")
    assert config["clean_up_tokenization_spaces"] is False
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    for messages in CONVERSATIONS:
        for gen in (True, False):
            ours = tok.apply_chat_template(messages, add_generation_prompt=gen)
            theirs = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert ours == theirs
        ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids if isinstance(ids, list) else ids["input_ids"]  # transformers 5 returns a BatchEncoding
        assert ids == tok.apply_chat_template(messages, tokenize=True)
    for text in SAMPLES.values():
        assert hf(text)["input_ids"] == tok.encode(text, add_bos=True)  # HF adds BOS like DeepSeek's
        assert hf.decode(tok.encode(text)) == text
    # a pair as DeepSeek's LlamaTokenizerFast (add_bos_token) encodes it: BOS before each sequence
    assert hf("a b", "日本")["input_ids"] == [
        *tok.encode("a b", add_bos=True),
        *tok.encode("日本", add_bos=True),
    ]

    hf.save_pretrained(str(tmp_path / "resaved"))  # transformers 5 writes chat_template.jinja
    resaved = load_tokenizer(tmp_path / "resaved")
    assert resaved.chat_template == R1_CHAT_TEMPLATE and resaved.bos_token_id == tok.bos_token_id
    resaved.save(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )

    again = load_tokenizer(tmp_path)
    assert again.encode(SAMPLES["mixed"]) == tok.encode(SAMPLES["mixed"])
    assert again.chat_template == R1_CHAT_TEMPLATE
    assert load_tokenizer(tmp_path / "tokenizer.json").vocab_size == tok.vocab_size


def test_a_checkpoint_a_crash_left_aside_loads_its_tokenizer(tok: Tokenizer, tmp_path: Path) -> None:
    """After a crash between a save's two renames `nanoseek.load_model(RUN/grpo)` reads the copy left
    aside; `nanoseek.load_tokenizer(RUN/grpo)` said "tokenizer not found" for the same directory."""
    target = tmp_path / "grpo"
    tok.save(target)
    target.rename(tmp_path / ".grpo.tmp-old")  # where atomic_directory's swap had put it
    assert load_tokenizer(target).encode("東京 42") == tok.encode("東京 42")
    assert not target.exists()  # read where it is: moving it back is the writer's job


def test_load_hf_saved_and_deepseek_style_config(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok.backend, bos_token=BOS, eos_token=EOS)
    hf.save_pretrained(str(tmp_path / "hf"))
    loaded = load_tokenizer(tmp_path / "hf")
    assert loaded.bos_token_id == tok.bos_token_id and loaded.encode("日本") == tok.encode("日本")
    assert loaded.pad_token == PAD  # no pad_token in that config: the vocabulary's own, not EOS
    # the older list format: transformers takes the one named "default", wherever it is in the list
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"}, {"name": "default", "template": R1_CHAT_TEMPLATE}]  # fmt: skip
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path / "hf").chat_template == R1_CHAT_TEMPLATE

    # DeepSeek's tokenizer_config.json: special tokens as AddedToken dicts, LlamaTokenizerFast class.
    ds = tmp_path / "deepseek"
    ds.mkdir()
    (ds / "tokenizer.json").write_text(tok.backend.to_str())
    added = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False}
    (ds / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": {"content": BOS, **added},
                "eos_token": {"content": EOS, **added},
                "pad_token": {"content": EOS, **added},
                "legacy": True,
                "tokenizer_class": "LlamaTokenizerFast",
                "chat_template": R1_CHAT_TEMPLATE,
            }
        )
    )
    loaded = load_tokenizer(ds)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (BOS, EOS, EOS)
    assert loaded.apply_chat_template(CONVERSATIONS[0]) == tok.apply_chat_template(CONVERSATIONS[0])


def test_load_foreign_tokenizer_and_template(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    backend = Backend(models.WordLevel({**vocab, "hello": 3, "world": 4, "[UNK]": 5}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    backend.add_special_tokens(list(vocab))
    backend.save(str(tmp_path / "tokenizer.json"))
    # No config: a vocabulary without BOS separates documents with its end-of-text token.
    bare = load_tokenizer(tmp_path)
    assert bare.eos_token == "<|endoftext|>" and bare.bos_token_id == bare.eos_token_id == 0
    # ...but a prompt gets no such token in front, as transformers encodes it (generate, /v1/completions)
    assert not bare.add_bos_token and bare.encode("hello", add_bos=bare.add_bos_token) == [3]
    chatml = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": chatml,
            }
        )
    )
    t = load_tokenizer(tmp_path)
    assert t.eos_token_id == 2 and t.pad_token_id == 0
    # ...and no end-of-text token in front of a prompt either (a Qwen2.5-Instruct tokenizer saved by
    # transformers 5 says "bos_token": null and no add_bos_token), as transformers encodes it
    assert t.bos_token_id == 0 and t.encode("hello", add_bos=t.add_bos_token) == [3]
    msgs = [{"role": "user", "content": "hello world"}]
    assert t.apply_chat_template(msgs) == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    # a config that names no bos_token at all: no end-of-text token in front of a prompt either
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "chat_template": chatml})
    )
    t = load_tokenizer(tmp_path)
    assert t.eos_token_id == 2 and t.encode("hello", add_bos=t.add_bos_token) == [3]


def test_a_null_bos_token_wins_over_a_bos_the_vocabulary_holds(tmp_path: Path) -> None:
    """`"bos_token": null` says nothing goes before a prompt, even where the vocabulary has an <s>: as
    transformers encodes it (no BOS), not as the fallback that finds <s> among the candidates."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers
    from transformers import AutoTokenizer

    backend = Backend(models.WordLevel({"<s>": 0, "</s>": 1, "hello": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "</s>"}))
    t = load_tokenizer(tmp_path)
    assert t.add_bos_token is False
    assert (
        t.encode("hello", add_bos=t.add_bos_token)
        == AutoTokenizer.from_pretrained(tmp_path)("hello").input_ids
        == [2]
    )


def test_foreign_template_failing_on_the_messages_is_a_value_error(tok: Tokenizer) -> None:
    # DeepSeek-V3.1's own template concatenates each tool's description, which OpenAI's API makes optional:
    # what such a template cannot render is the request's fault (the server's 400), not a jinja2 crash (500).
    v31_tools = (
        "{% for tool in tools %}{{ '### ' + tool.function.name + '\\nDescription: ' + tool.function.description }}"
        "{% endfor %}{% for m in messages %}{{ '<｜User｜>' + m['content'] }}{% endfor %}"
    )
    t = Tokenizer(tok.backend, chat_template=v31_tools)
    tool = {"type": "function", "function": {"name": "f", "description": "d"}}
    assert t.apply_chat_template(CONVERSATIONS[0][:1], tools=[tool]).startswith("### f\nDescription: d")
    with pytest.raises(ValueError, match="chat template.*description"):
        t.apply_chat_template(CONVERSATIONS[0][:1], tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(ValueError, match="chat template"):  # str + None: a TypeError inside the template
        t.apply_chat_template(
            CONVERSATIONS[0][:1], tools=[{"type": "function", "function": {"name": "f", "description": None}}]
        )


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json .*tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path)
    # a run directory: its tokenizer/ folder was named as a slow tokenizer's file ("found tokenizer; only
    # the fast-tokenizer format is supported"), not as the directory to pass
    run = tmp_path / "run"
    (run / "tokenizer").mkdir(parents=True)
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"a directory inside has one: .*run/tokenizer\)$"):
        load_tokenizer(run)


def test_load_reads_a_tilde_path_and_a_checkpoint_left_aside_as_load_model_does(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`nanoseek.load_tokenizer` reads the directory `nanoseek.load_model` reads: `~/ckpt` (load_model
    expands it; this said "tokenizer not found: ~/ckpt") and a checkpoint a crash between a save's two
    renames left aside (load_model, chat and serve read it where it lies)."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tok.save(ckpt)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_tokenizer("~/ckpt").encode("2 + 2") == tok.encode("2 + 2")
    ckpt.rename(tmp_path / ".ckpt.tmp-old")  # where the swap had put it
    assert load_tokenizer(ckpt).encode("2 + 2") == tok.encode("2 + 2")
    assert not ckpt.exists()  # a reader leaves it there (the writer may be between its renames)


# ------------------------------------------------------------------ streaming decode
def test_incremental_decoder_never_splits_characters(tok: Tokenizer) -> None:
    # Characters the tokenizer never saw are spelled in bytes, several tokens per character.
    text = SAMPLES["emoji"] + "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦀 Ωμέγα " + SAMPLES["japanese"] + SAMPLES["mixed"]
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) + dec.flush() == text == dec.text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some character spans several tokens and was held back
    # Batches of ids and skip_special_tokens behave like decode().
    ids = tok.encode(f"{BOS}答え<think>x</think>{EOS}")
    dec = IncrementalDecoder(tok, skip_special_tokens=True)
    out = dec.push(ids[:3]) + dec.push(ids[3:]) + dec.flush()
    assert out == tok.decode(ids, skip_special_tokens=True) == "答え<think>x</think>"
    import torch

    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)  # tensors and numpy arrays work too
    assert IncrementalDecoder(tok).push(torch.tensor(ids[0])) == tok.decode(ids[:1])
    # An unfinished character at the end of the stream becomes U+FFFD, as decode() does.
    # (🦀 is not in the training corpus, so it is spelled in several byte tokens; 😀 is one token)
    cut = IncrementalDecoder(tok)
    first, *_ = tok.encode("🦀")
    assert tok.token_bytes()[first] != "🦀".encode()
    assert cut.push(first) == "" and cut.flush() == "\ufffd" == tok.decode([first])
    # ...or is left out with drop_partial (as vLLM leaves it out at a stop)
    cut = IncrementalDecoder(tok)
    assert cut.push(first) == "" and cut.flush(drop_partial=True) == "" == cut.text
    # an id past the vocabulary (a model's padded embedding rows) decodes to nothing, as decode() does
    assert (
        IncrementalDecoder(tok).push([tok.vocab_size, tok.vocab_size + 1])
        == ""
        == tok.decode([tok.vocab_size])
    )
    # a negative id (a -100 label) is refused by value in both, not an OverflowError from Rust in one and
    # dropped without a word in the other
    for decode in (tok.decode, IncrementalDecoder(tok).push):
        with pytest.raises(ValueError, match="token ids must be >= 0, got -100"):
            decode([ids[0], -100])


def test_incremental_decoder_fallback_for_non_byte_level(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models

    # Llama-2 style: characters outside the vocabulary fall back to <0xNN> byte tokens.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for c in "abc ":
        vocab[c] = len(vocab)
    backend = Backend(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(["<s>", "</s>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path)
    assert not t.is_byte_level and t.bos_token == "<s>"
    text = "ab 日本 c😀"
    ids = t.encode(text)
    assert t.decode(ids) == text
    dec = t.incremental_decoder()
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) + dec.flush() == text
    assert all("\ufffd" not in d for d in deltas)
    cut = t.incremental_decoder()
    assert cut.push(t.encode("日")[:2]) == "" and cut.flush(drop_partial=True) == "" == cut.text


def test_incremental_decoder_fallback_keeps_the_space_a_sentencepiece_decoder_strips(tmp_path: Path) -> None:
    """Llama-2's decoder strips the leading space of what it decodes: the streamed text must still
    equal decode(all ids) token by token, and a generation's first word keeps its space after the
    prompt given as context (vLLM primes its detokenizer with the prompt)."""
    from model_configs import sentencepiece_tokenizer

    t = sentencepiece_tokenizer(tmp_path)
    ids = t.encode("The capital is Paris.")
    dec = t.incremental_decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == t.decode(ids) == "The capital is Paris."
    prompt, answer = t.encode("The capital is"), t.encode("Paris")
    assert t.decode(answer) == "Paris" and t.decode(prompt + answer) == "The capital is Paris"
    dec = t.incremental_decoder(context=prompt)
    assert "".join(dec.push(i) for i in answer) + dec.flush() == " Paris"


def test_incremental_decoder_fallback_streams_a_long_run_of_byte_tokens_whole(tmp_path: Path) -> None:
    """Emoji outside a byte-fallback vocabulary are runs of <0xNN> tokens, which the decoder reads as one
    U+FFFD per byte when the run does not start on a character: the re-decoded window must not start
    inside one. A ZWJ family (11 bytes) and two emoji in a row streamed as U+FFFDs."""
    from model_configs import sentencepiece_tokenizer

    t = sentencepiece_tokenizer(tmp_path)
    for text in ["The 👩\u200d👧 is 😀😀😀.", "😀😀", "Paris 日本語👍🏽"]:
        ids = t.encode(text)
        dec = t.incremental_decoder()
        assert "".join(dec.push(i) for i in ids) + dec.flush() == t.decode(ids) == text


def _chunks(ids: list[int], cuts: list[int]) -> list[list[int]]:
    """`ids` cut where `cuts` say (positions, any order): the pushes a stream of several ids a step makes."""
    edges = sorted({0, len(ids), *(c % (len(ids) + 1) for c in cuts)})
    return [ids[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@pytest.fixture(scope="module")
def sp(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    from model_configs import sentencepiece_tokenizer

    return sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))


_BYTE_IDS = st.sampled_from(sorted(_UNICODE_TO_BYTE))  # the 256 single-byte tokens, by their character


@settings(max_examples=150)
@given(data=st.data(), skip=st.booleans(), cuts=st.lists(st.integers(0, 40), max_size=6), drop=st.booleans())
def test_streamed_text_is_always_a_prefix_of_decode_and_ends_equal_to_it(
    tok: Tokenizer, data, skip: bool, cuts: list[int], drop: bool
) -> None:
    """Any ids (single bytes that split a character or make invalid UTF-8, markup, ids past the
    vocabulary), pushed in any chunks: what has come out is always a prefix of decode(all ids), so no
    U+FFFD is emitted for a character the next id completes, and flush() ends it equal (or, dropping
    the unfinished character, short of the one U+FFFD decode() ends with for it)."""
    byte_ids = _BYTE_IDS.map(tok.token_to_id)
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size + 1) | byte_ids, max_size=30))
    whole = tok.decode(ids, skip_special_tokens=skip)
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    out = ""
    for chunk in _chunks(ids, cuts):
        out += dec.push(chunk)
        assert whole.startswith(out)
    out += dec.flush(drop_partial=drop)
    assert out == dec.text and dec.chars == len(out)
    assert out == whole or (drop and out + "\ufffd" == whole)


def test_drop_partial_leaves_out_only_the_start_of_a_character(tok: Tokenizer) -> None:
    """The shrunk case of the property above: bytes ED A1 (a surrogate's start, invalid UTF-8 whatever
    follows) are held by CPython's incremental decoder as if a character were coming, and flush(drop_partial)
    left out the two U+FFFDs decode() gives them."""
    byte_id = {b: tok.token_to_id(c) for c, b in _UNICODE_TO_BYTE.items()}
    ids = [byte_id[0xED], byte_id[0xA1]]
    assert tok.decode(ids) == "\ufffd\ufffd"
    dec = tok.incremental_decoder()
    assert dec.push(ids) + dec.flush(drop_partial=True) == "\ufffd\ufffd" == dec.text
    dec = tok.incremental_decoder()  # a character's start is still left out
    assert dec.push(tok.encode("a🦀")[:-1]) == "a" and dec.flush(drop_partial=True) == ""


@settings(max_examples=100)
@given(prompt=_texts, answer=_texts, skip=st.booleans(), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_fallback_streams_any_text_as_decode_reads_it(
    sp: Tokenizer, prompt: str, answer: str, skip: bool, cuts: list[int]
) -> None:
    """The re-decoding path (SentencePiece-style byte fallback, a decoder that strips the leading
    space), primed with a prompt: the answer's deltas are what decode(prompt + answer) adds to the prompt's
    text, never a U+FFFD the text does not hold. (Valid text only: a run of byte tokens that is not UTF-8
    decodes to one U+FFFD per byte of the whole run, so a later id rewrites what decode() gave before.)"""
    p, a = sp.encode(prompt), sp.encode(answer)
    head, whole = sp.decode(p, skip_special_tokens=skip), sp.decode(p + a, skip_special_tokens=skip)
    dec = sp.incremental_decoder(skip_special_tokens=skip, context=p)
    out = ""
    for chunk in _chunks(a, cuts):
        out += dec.push(chunk)
        assert (head + out) == whole[: len(head + out)]
    assert head + out + dec.flush() == whole


# ------------------------------------------------------------------ CLI
def test_cli_train_encode_decode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nanoseek.cli import main

    data = tmp_path / "corpus.txt"
    data.write_text("\n<|endoftext|>\n".join(_corpus(200)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "500", "--out", str(out)]) == 0
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    assert str(out) in capsys.readouterr().out
    assert main(["tokenizer", "encode", str(out), "東京 42"]) == 0
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == load_tokenizer(out).encode("東京 42")
    assert main(["tokenizer", "decode", str(out), *ids]) == 0
    assert capsys.readouterr().out == "東京 42\n"
    assert main(["tokenizer", "decode", str(out), "12x"]) == 2  # bad input: clear error, no traceback
    assert "12x" in capsys.readouterr().err
    for digits in ("²", "٣"):  # Unicode digits are no ids ("٣" was read as id 3, "²" crashed int())
        assert main(["tokenizer", "decode", str(out), digits]) == 2
        assert f"not a token id: {digits!r}" in capsys.readouterr().err
    # the last id is the vocabulary's; its size and below zero are not (as HF's decode refuses them)
    tok = load_tokenizer(out)
    assert main(["tokenizer", "decode", str(out), str(tok.vocab_size - 1)]) == 0
    capsys.readouterr()
    for bad in (str(tok.vocab_size), "-1"):
        assert main(["tokenizer", "decode", str(out), bad]) == 2
        assert f"token id {bad} is outside the vocabulary (size {tok.vocab_size})" in capsys.readouterr().err
    # ids as `encode --bos` printed them, or comma-separated; --skip-special-tokens drops the BOS
    with_bos = tok.encode("東京 42", add_bos=True)
    assert main(["tokenizer", "decode", str(out), ",".join(map(str, with_bos))]) == 0
    assert capsys.readouterr().out == tok.decode(with_bos) + "\n" != "東京 42\n"
    assert main(["tokenizer", "decode", str(out), "--skip-special-tokens", *map(str, with_bos)]) == 0
    assert capsys.readouterr().out == "東京 42\n"
    # --tokens: one id<TAB>token-text line per id, as --help says
    assert main(["tokenizer", "encode", str(out), "--tokens", "42"]) == 0
    want = [f"{i}\t{tok.decode([i])!r}" for i in tok.encode("42")]
    assert capsys.readouterr().out.splitlines() == want
    assert main(["tokenizer", "encode", str(tmp_path / "nope"), "x"]) == 2


def test_cli_encode_reads_stdin_without_its_byte_order_mark(
    tok: Tokenizer, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`Get-Content text.txt | nanoseek tokenizer encode TOK` (PowerShell), or a file a Windows editor
    saved: the byte-order mark was encoded as the text's first tokens; `generate -` drops it already."""
    import io
    import sys

    from nanoseek.cli import main

    tok.save(tmp_path / "tok")
    monkeypatch.setattr(sys, "stdin", io.StringIO("\ufeff東京 42"))
    assert main(["tokenizer", "encode", str(tmp_path / "tok")]) == 0
    assert [int(i) for i in capsys.readouterr().out.split()] == tok.encode("東京 42")
    # `encode TOK | decode TOK` round-trips: decode reads the ids from stdin where none are given
    ids = " ".join(map(str, tok.encode("東京 42"))) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(ids))
    assert main(["tokenizer", "decode", str(tmp_path / "tok")]) == 0
    assert capsys.readouterr().out == "東京 42\n"
    # given as an argument, the text is the user's own, mark and all
    assert main(["tokenizer", "encode", str(tmp_path / "tok"), "\ufeff東京"]) == 0
    assert [int(i) for i in capsys.readouterr().out.split()] == tok.encode("\ufeff東京") != tok.encode("東京")


def test_cli_prints_what_an_ascii_stdout_cannot_encode_escaped(tok: Tokenizer, tmp_path: Path) -> None:
    """Under PYTHONIOENCODING=ascii (or a legacy console code page) a decoded CJK token raised
    UnicodeEncodeError and the command exited 2 as if it were misused; the text comes out escaped."""
    import os
    import subprocess
    import sys

    tok.save(tmp_path)
    ids = [str(i) for i in tok.encode("東京 42")]
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    cmd = [sys.executable, "-m", "nanoseek", "tokenizer", "decode", str(tmp_path), *ids]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="ascii", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "\\u6771\\u4eac 42\n"


def test_cli_prints_escaped_under_a_c_locale_without_utf8_mode(tok: Tokenizer, tmp_path: Path) -> None:
    """In the C locale with PYTHONUTF8=0 Python opens stdout in ASCII with surrogateescape, not strict: the
    first CJK token `nanoseek chat` or `generate` printed ended the command as a usage error."""
    import os
    import subprocess
    import sys

    tok.save(tmp_path)
    ids = [str(i) for i in tok.encode("東京 42")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    cmd = [sys.executable, "-m", "nanoseek", "tokenizer", "decode", str(tmp_path), *ids]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding="ascii", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "\\u6771\\u4eac 42\n"


def test_cli_train_measures_its_summary_on_a_bounded_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the summary held the first 200 documents whole and encoded them at once: on a corpus of
    # 1M-character documents (a .txt without separators, long JSONL texts) 5-9 GB beside the training
    import nanoseek.tokenizer
    from nanoseek.cli import main

    sampled: list[int] = []
    summary = nanoseek.tokenizer.tokenizer_summary
    monkeypatch.setattr(
        nanoseek.tokenizer,
        "tokenizer_summary",
        lambda tok, docs: sampled.append(sum(map(len, docs))) or summary(tok, docs),
    )
    data = tmp_path / "long.txt"
    data.write_text("the cat sat on 42 mats\n" * 120_000)  # 2.8M characters: three 1M-character documents
    assert (
        main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(tmp_path / "t")])
        == 0
    )
    assert "chars/token on 1 docs" in capsys.readouterr().out
    assert sampled == [1_000_000]


def _cli_trained_tokenizer(tmp_path: Path) -> tuple[Path, Path]:
    """(corpus, tokenizer directory): a 300-token tokenizer trained by `nanoseek tokenizer train`."""
    from nanoseek.cli import main

    data = tmp_path / "corpus.txt"
    data.write_text("\n<|endoftext|>\n".join(_corpus(50)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "300", "--out", str(out)]) == 0
    return data, out


def test_cli_encode_flags_before_the_text_and_clear_train_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanoseek.cli import main

    data, out = _cli_trained_tokenizer(tmp_path)
    capsys.readouterr()
    # flags between the tokenizer and the text, as the usage line allows (was "unrecognized arguments")
    assert main(["tokenizer", "encode", str(out), "--bos", "東京 42"]) == 0
    assert [int(i) for i in capsys.readouterr().out.split()] == load_tokenizer(out).encode(
        "東京 42", add_bos=True
    )
    # a corpus with no text is an error, not a saved tokenizer of bytes alone (exit 0 before)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    assert main(["tokenizer", "train", "--data", str(empty), "--out", str(tmp_path / "t2")]) == 2
    assert "no documents in" in capsys.readouterr().err and not (tmp_path / "t2").exists()
    # --out naming a file: said before training (a FileExistsError traceback after it before)
    assert main(["tokenizer", "train", "--data", str(data), "--out", str(data)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    # --out naming a checkpoint (a run's RUN/pretrain): its tokenizer was replaced under its weights
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"")
    (ckpt / "tokenizer.json").write_text((out / "tokenizer.json").read_text())
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "280", "--out", str(ckpt)]) == 2
    assert "holds a model checkpoint" in capsys.readouterr().err
    assert (ckpt / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    # --max-docs 0 names the flag, before reading anything (not "no documents in" the corpus)
    assert (
        main(["tokenizer", "train", "--data", str(data), "--max-docs", "0", "--out", str(tmp_path / "t3")])
        == 2
    )
    assert "--max-docs must be positive, got 0" in capsys.readouterr().err


def test_cli_train_refuses_an_out_it_cannot_write_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An --out under a file (or on a read-only disk) failed at the save, after the whole training."""
    import nanoseek.tokenizer
    from nanoseek.cli import main

    def train(*a, **k):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(nanoseek.tokenizer, "train_tokenizer", train)
    (tmp_path / "file").write_text("")
    assert main(["tokenizer", "train", "--max-docs", "10", "--out", str(tmp_path / "file" / "tok")]) == 2
    assert f"{tmp_path / 'file'}: Not a directory" in capsys.readouterr().err


def test_cli_train_bar_ends_at_100_percent_on_a_corpus_shorter_than_max_docs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-docs is at most: a corpus of 30 documents left the bar at 30/1000 (3%)."""
    from nanoseek.cli import main

    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _corpus(30)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(data), "--max-docs", "1000", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "100%" in err and "30/30" in err and "30/1000" not in err, err


def test_cli_encode_text_after_double_dash_and_a_short_vocabulary_note_that_helps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from nanoseek.cli import main

    data = tmp_path / "corpus.txt"
    data.write_text("\n<|endoftext|>\n".join(_corpus(50)))
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(data), "--vocab-size", "5000", "--out", str(out)]) == 0
    # every document was read (no --max-docs): raising --max-docs cannot help, as the note said it would
    note = capsys.readouterr().err  # a warning: on stderr, the summary alone on stdout
    assert "note: the corpus supports only" in note and "--max-docs" not in note
    assert (
        main(
            ["tokenizer", "train", "--data", str(data), "--vocab-size", "5000", "--max-docs", "5"]
            + ["--out", str(out)]
        )
        == 0
    )
    assert "use more documents (--max-docs)" in capsys.readouterr().err
    # "--" lets the text start with a dash after the flags too (was "unrecognized arguments: -- -5")
    assert main(["tokenizer", "encode", str(out), "--bos", "--", "-5"]) == 0
    assert [int(i) for i in capsys.readouterr().out.split()] == load_tokenizer(out).encode("-5", add_bos=True)
    # a bare "--" ends the options and gives no text: stdin is read, as `cat --` reads it (was "unrecognized
    # arguments: --")
    monkeypatch.setattr("sys.stdin", io.StringIO("-5"))
    assert main(["tokenizer", "encode", str(out), "--bos", "--"]) == 0
    assert [int(i) for i in capsys.readouterr().out.split()] == load_tokenizer(out).encode("-5", add_bos=True)


def test_cli_encode_reads_a_closed_stdin_as_an_empty_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `nanoseek tokenizer encode DIR <&-` (as `chat DIR <&-` and `generate DIR - <&-`): Python leaves
    # sys.stdin None where fd 0 is closed, and the command died with an AttributeError traceback
    import sys

    from nanoseek.cli import main

    data, out = _cli_trained_tokenizer(tmp_path)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", None)
    assert main(["tokenizer", "encode", str(out)]) == 0  # as `< /dev/null`: no text, no ids
    assert capsys.readouterr().out == "\n"
    sys.stdin.close()


@pytest.mark.skipif(
    importlib.util.find_spec("nanoseek.data.synthetic") is None, reason="embedded corpus not built yet"
)
def test_train_on_embedded_corpus_is_fast() -> None:
    import itertools

    from nanoseek.data.corpus import iter_documents

    start = time.perf_counter()
    tok = train_tokenizer(itertools.islice(iter_documents("embedded"), 3000), vocab_size=2048)
    assert time.perf_counter() - start < 60
    assert tok.vocab_size <= 2048
    sample = next(iter(iter_documents("embedded", seed=1)))
    assert tok.decode(tok.encode(sample)) == sample


# ------------------------------------------------------------------ V3.1: thinking off, tools
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "都市"}}},
    },
}
CALLS = [
    {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
    {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}},
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {"role": "assistant", "content": "<think>\nlook it up\n</think>\nChecking.", "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "a", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "b", "content": '{"temp": 25}'},
    {"role": "assistant", "content": "21 and 25."},
    {"role": "user", "content": "Thanks"},
]


# Property tests' chats: OpenAI's function names, JSON arguments (finite numbers: NaN is not JSON), calls
# whose arguments are an object, its JSON text, null or missing, and tools whose description and
# parameters are there, null or missing.
_names = st.from_regex(r"[A-Za-z0-9_\-]{1,12}", fullmatch=True)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _texts,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(_chars, max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_json_objects = st.dictionaries(st.text(_chars, max_size=5), _json, max_size=4)


def _call(name: str, arguments: Any) -> dict[str, Any]:
    absent = arguments is ...
    return {"type": "function", "function": {"name": name, **({} if absent else {"arguments": arguments})}}


_calls = st.lists(
    st.builds(_call, _names, st.just(...) | st.none() | _json_objects | _json_objects.map(json.dumps)),
    min_size=1,
    max_size=3,
)


def _message(
    role: str, content: str | None, tool_calls: list | None, reasoning: str | None
) -> dict[str, Any]:
    if role != "assistant":
        return {"role": role, "content": content or ""}
    extra = {"tool_calls": tool_calls} if tool_calls else {}
    return {
        "role": role,
        "content": content,
        **extra,
        **({"reasoning_content": reasoning} if reasoning else {}),
    }


_roles = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
_conversations = st.lists(
    st.builds(_message, _roles, st.none() | _texts, st.none() | _calls, st.none() | _texts),
    min_size=1,
    max_size=7,
)
_optional = {"description": st.none() | _texts, "parameters": st.none() | _json_objects}
_tools = st.lists(
    st.builds(
        lambda name, extra: {"type": "function", "function": {"name": name, **extra}},
        _names,
        st.fixed_dictionaries({}, optional=_optional),
    ),
    min_size=1,
    max_size=2,
)


def test_thinking_on_off_and_system_prompt_first(tok: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "q"}, {"role": "system", "content": "Be brief."}]
    on = tok.apply_chat_template(msgs)
    off = tok.apply_chat_template(msgs, thinking=False)
    # R1-0528: the system text comes first, right after BOS, before the first <｜User｜>, wherever it was
    assert on == f"{BOS}Be brief.{USER}q{ASSISTANT}{THINK_START}\n"
    assert off == f"{BOS}Be brief.{USER}q{ASSISTANT}{THINK_END}"
    assert tok.apply_chat_template(msgs, tokenize=True, thinking=False)[-2:] == [
        tok.token_to_id(ASSISTANT),
        tok.think_end_id,
    ]


def test_tools_and_tool_calls_render(tok: Tokenizer) -> None:
    from nanoseek.tokenizer import TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, render_tool_calls

    text = tok.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER])
    system, _, turns = text.partition(USER)
    assert system.startswith(f"{BOS}Be brief.\n\n## Tools\n")
    assert '### get_weather\nDescription: Current weather\n\nParameters: {"type": "object"' in system
    assert "都市" in system  # parameters as JSON, not ASCII-escaped
    calls = render_tool_calls(CALLS)
    assert '<｜tool▁sep｜>{"city": "東京"}<｜tool▁call▁end｜>' in calls  # dict arguments become JSON
    assert turns.startswith(
        f"Weather in Paris and Tokyo?{ASSISTANT}Checking.{calls}{EOS}"
        f'{TOOL_OUTPUT_BEGIN}{{"temp": 21}}{TOOL_OUTPUT_END}{TOOL_OUTPUT_BEGIN}{{"temp": 25}}{TOOL_OUTPUT_END}'
        f"21 and 25.{EOS}{USER}Thanks{ASSISTANT}{THINK_START}\n"
    )  # the answer after the tool results continues the turn: no <｜Assistant｜> of its own
    # right after tool results there is no generation prompt: the model goes on with its turn
    assert tok.apply_chat_template(TOOL_CONVERSATION[:5], thinking=False).endswith(TOOL_OUTPUT_END)
    ids = tok.apply_chat_template(TOOL_CONVERSATION, tokenize=True, tools=[WEATHER])
    assert all(
        tok.token_to_id(t) in ids for t in ("<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>", TOOL_OUTPUT_END)
    )
    with pytest.raises(ValueError, match="tools\\[0\\]"):
        tok.apply_chat_template(TOOL_CONVERSATION, tools=[{"type": "function", "function": {}}])
    with pytest.raises(ValueError, match="tool_calls\\[0\\]"):
        tok.apply_chat_template([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}])
    for calls in (5, CALLS[0]):  # not a list: was a TypeError, or a dict's keys read as calls
        with pytest.raises(ValueError, match="message 1: tool_calls must be a list"):
            tok.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": calls}]
            )


# Whatever a chat file's JSON holds where a string or an object belongs (`nanoseek sft` reads such files
# without a schema, the server after one)
_any = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _texts,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["type", "text", "name"]), inner)
    ),
    max_leaves=6,
)
_parts = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "refusal", "image_url"])}, optional={"text": _any, "refusal": _any}
    ),
    max_size=3,
)
_fields = {"name": _any | _names, "arguments": _any, "description": _any, "parameters": _any}
_functions = st.fixed_dictionaries(
    {"type": st.just("function")}, optional={"function": st.fixed_dictionaries({}, optional=_fields)}
)
_files_messages = st.fixed_dictionaries(
    {"role": _roles},
    optional={"content": _any | _parts, "tool_calls": st.lists(_functions, max_size=2), "reasoning": _any},
)


@settings(max_examples=50)
@given(
    messages=st.lists(_files_messages, min_size=1, max_size=3),
    tools=st.none() | st.lists(_functions, max_size=2),
)
def test_any_chat_json_renders_as_transformers_would_or_is_a_value_error(
    tok: Tokenizer, hf, messages: list[dict], tools: list | None
) -> None:
    """A message of any JSON shape (content parts whose text is a number, a tool named by a list...)
    renders as transformers renders the saved template, or is refused with a ValueError naming what is
    wrong (`nanoseek sft` names the file's line for a ValueError; another exception was a bare traceback,
    and a number written as a name or a description trained a prompt transformers never renders)."""
    from nanoseek.tokenizer import openai_message

    try:
        readable = [openai_message(m) for m in messages]
        assert [openai_message(m) for m in readable] == readable  # read once is read for good
        ours = render_chat(readable, tools=tools)
    except ValueError:
        return
    assert ours == hf.apply_chat_template(readable, tools=tools, add_generation_prompt=True, tokenize=False)


def test_wrong_types_in_a_chat_file_are_value_errors_naming_them() -> None:
    """The shrunk cases of the property above: a text part whose text is not a string was a TypeError from
    the join; a tool or a call named by a number, or a tool described by one, rendered its digits (the saved
    template fails on it in transformers, and the server's parser reads back only string names)."""
    from nanoseek.tokenizer import content_text, render_tool_calls, render_tools

    with pytest.raises(ValueError, match="content part 'text' must be a string, got list"):
        content_text([{"type": "text", "text": [None]}])
    with pytest.raises(ValueError, match="tools\\[0\\]"):
        render_tools([{"type": "function", "function": {"name": True}}])
    with pytest.raises(ValueError, match="tools\\[1\\]: description must be a string, got int"):
        render_tools([WEATHER, {"type": "function", "function": {"name": "f", "description": 5}}])
    with pytest.raises(ValueError, match="tool_calls\\[0\\] needs function.name"):
        render_tool_calls([{"type": "function", "function": {"name": 5}}])


def test_tool_call_parse_and_round_trip() -> None:
    from nanoseek.tokenizer import (
        TOOL_CALL_BEGIN,
        TOOL_CALL_END,
        TOOL_CALLS_BEGIN,
        TOOL_CALLS_END,
        TOOL_SEP,
        parse_tool_calls,
        render_tool_calls,
    )

    calls = [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": [2, 3]}'}},
    ]
    text = "Let me check." + render_tool_calls(calls)
    assert parse_tool_calls(text) == ("Let me check.", calls)
    assert parse_tool_calls(text + "\n", names=["get_weather", "add"]) == ("Let me check.", calls)
    assert parse_tool_calls(render_tool_calls(calls[:1])) == ("", calls[:1])
    assert parse_tool_calls("Let me check." + render_tool_calls(calls, fenced=True)) == (
        "Let me check.",
        calls,
    )
    # calls one per line, as DeepSeek-V3's template writes them (vLLM's DeepSeek parsers accept it too)
    spaced = render_tool_calls(calls).replace(TOOL_CALL_BEGIN, "\n" + TOOL_CALL_BEGIN)
    spaced = spaced.replace(TOOL_CALLS_END, "\n" + TOOL_CALLS_END)
    assert parse_tool_calls("Let me check." + spaced) == ("Let me check.", calls)
    assert (
        parse_tool_calls(spaced.replace("\n" + TOOL_CALL_BEGIN + "add", "and" + TOOL_CALL_BEGIN + "add"))
        is None
    )

    def one(name: str, args: str) -> str:
        return f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}{name}{TOOL_SEP}{args}{TOOL_CALL_END}{TOOL_CALLS_END}"

    for bad in (
        "no calls at all",
        one("get_weather", '{"city": Paris}'),  # not JSON
        one("get_weather", "[1, 2]"),  # JSON, but not an object
        one("", "{}"),  # no name
        one("get_weather", "{}")[: -len(TOOL_CALLS_END)],  # unclosed
        one("get_weather", "{}") + " and more text",
        f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}get_weather{{}}{TOOL_CALL_END}{TOOL_CALLS_END}",  # no separator
        f"{TOOL_CALLS_BEGIN}{TOOL_CALLS_END}",  # no call
    ):
        assert parse_tool_calls(bad) is None, bad
    assert parse_tool_calls(one("rm", "{}"), names=["get_weather"]) is None
    # a call given without arguments renders as an empty object, which reads back as one
    bare = [{"type": "function", "function": {"name": "f"}}]
    assert parse_tool_calls(render_tool_calls(bare)) == ("", [{"type": "function", "function": {"name": "f", "arguments": "{}"}}])  # fmt: skip


@settings(max_examples=120)
@given(content=_texts, calls=_calls, fenced=st.booleans(), layout=st.sampled_from(["", "\n", " \n "]))
def test_rendered_tool_calls_parse_back_to_the_same_calls(
    content: str, calls: list[dict], fenced: bool, layout: str
) -> None:
    """parse_tool_calls(text + render_tool_calls(calls)) gives the text and the calls back: the same
    names, arguments that read as the same JSON (an absent or null one as {}), in V3.1's format and in
    V3's fenced one, whitespace after the block allowed. (The format has no escape: text, or a string in
    the arguments, that spells the block's own markup reads otherwise, as in vLLM's DeepSeek parsers.)"""
    from nanoseek.tokenizer import TOOL_CALLS_BEGIN, TOOL_CALLS_END, parse_tool_calls, render_tool_calls

    block = render_tool_calls(calls, fenced=fenced)
    ends = block.count(TOOL_CALL_END), block.count(TOOL_CALLS_END)
    assume(TOOL_CALLS_BEGIN not in content and ends == (len(calls), 1))
    parsed = parse_tool_calls(content + block + layout, names=[c["function"]["name"] for c in calls])
    assert parsed is not None and parsed[0] == content
    assert [c["function"]["name"] for c in parsed[1]] == [c["function"]["name"] for c in calls]
    for got, call in zip(parsed[1], calls, strict=True):
        given_args = call["function"].get("arguments")
        expected = json.loads(given_args) if isinstance(given_args, str) else given_args or {}
        assert json.loads(got["function"]["arguments"]) == expected


def test_tool_templates_agree_with_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for messages, tools in (
        (TOOL_CONVERSATION, [WEATHER]),
        (TOOL_CONVERSATION[:5], [WEATHER]),
        (TOOL_CONVERSATION[:6], [WEATHER]),  # the answer after a tool's result, then a generation prompt
        (
            [*TOOL_CONVERSATION[:4], TOOL_CONVERSATION[6], TOOL_CONVERSATION[5]],
            [WEATHER],
        ),  # a user after a tool
        ([*CONVERSATIONS[0], {"role": "assistant", "content": "r</think>\n  indented"}], None),
        # R1 keeps what follows the last </think>
        (
            [*CONVERSATIONS[0], {"role": "assistant", "content": "a</think>b</think>\nc"}, *CONVERSATIONS[0]],
            None,
        ),
        # OpenAI makes a tool's description and parameters optional
        (CONVERSATIONS[0], [{"type": "function", "function": {"name": "f"}}]),
        (CONVERSATIONS[1], None),
    ):
        for thinking in (True, False):
            ours = tok.apply_chat_template(messages, thinking=thinking, tools=tools)
            theirs = hf.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=False, thinking=thinking
            )
            assert ours == theirs
    vllm_style = hf.apply_chat_template(
        CONVERSATIONS[0], add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert vllm_style == tok.apply_chat_template(CONVERSATIONS[0], thinking=False)


@settings(max_examples=40)
@given(messages=_conversations, tools=st.none() | _tools, generation=st.booleans(), thinking=st.booleans())
def test_any_chat_renders_as_transformers_renders_the_saved_template(
    tok: Tokenizer, hf, messages: list, tools: list | None, generation: bool, thinking: bool
) -> None:
    """render_chat (what nanoseek runs) == the Jinja template it saves, run by transformers and by
    `_render_jinja` (what nanoseek runs for a template that is not its own): system and developer text,
    tool descriptions, calls with any arguments, tool results, reasoning and </think> in history, markup
    spelled in the text, thinking on and off, with and without a generation prompt."""
    from nanoseek.tokenizer import _render_jinja

    ours = tok.apply_chat_template(messages, add_generation_prompt=generation, thinking=thinking, tools=tools)
    assert ours == hf.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation, tokenize=False, thinking=thinking
    )
    flags = {"add_generation_prompt": generation, "thinking": thinking}
    assert ours == _render_jinja(R1_CHAT_TEMPLATE, messages=messages, tools=tools, bos_token=BOS, **flags)


def test_a_tool_call_without_arguments_renders_as_an_empty_object_here_and_in_transformers(
    tok: Tokenizer, tmp_path: Path
) -> None:
    """OpenAI clients may send back a call whose `arguments` is missing or null: the saved template
    raised in transformers ("Undefined is not JSON serializable") and ours rendered `null`, a call the
    model must never learn to make. Both render `{}`; a tokenizer saved with the template before loads as ours."""
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for function in ({"name": "now"}, {"name": "now", "arguments": None}):
        messages = [
            {"role": "user", "content": "time?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": function}],
            },
            {"role": "tool", "content": "12:00"},
        ]
        ours = tok.apply_chat_template(messages)
        assert f"now{TOOL_SEP}{{}}{TOOL_CALL_END}" in ours
        assert hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == ours
    before = _failing_without_arguments(R1_CHAT_TEMPLATE)
    assert before != R1_CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": before}))
    assert load_tokenizer(tmp_path).chat_template == R1_CHAT_TEMPLATE


def test_an_earlier_answer_reads_as_the_server_returned_it_however_it_was_stored(
    tok: Tokenizer, tmp_path: Path
) -> None:
    """History holds an answer as the server's `content` (what clients send back: no newlines after
    </think>), also where the turn kept its reasoning, as SFT data (`</think>\\n`) and `nanoseek chat`
    (`</think>\\n\\n`) store it: R1's split left those newlines, so a model trained on '\\n42' was served
    '42'. transformers renders the saved template the same, and a tokenizer saved before still loads as ours."""
    from transformers import AutoTokenizer

    def chat(answer: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}, {"role": "user", "content": "q2"}]  # fmt: skip

    served = tok.apply_chat_template(chat("42"))
    assert f"{ASSISTANT}42{EOS}{USER}" in served
    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for stored in ("<think>\nr\n</think>\n42", "<think>\nr\n</think>\n\n42", "r</think>42"):
        assert tok.apply_chat_template(chat(stored)) == served, stored
        assert hf.apply_chat_template(chat(stored), add_generation_prompt=True, tokenize=False) == served
    assert tok.apply_chat_template(chat("\n42")) != served  # only the layout after </think> goes
    # the template saved until then
    before = _refusing_developer(R1_CHAT_TEMPLATE).replace(".lstrip('\\n')", "")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": before}))
    assert load_tokenizer(tmp_path).chat_template == R1_CHAT_TEMPLATE


def _failing_without_arguments(template: str) -> str:
    """`template` as saved before it rendered a tool call without `arguments`."""
    return template.replace(
        "{%- if args is not defined or args is none %}{% set args = '{}' %}{% endif %}", ""
    )


def _refusing_developer(template: str) -> str:
    """`template` as saved before it took the `developer` role (and before the ones after it)."""
    template = _failing_without_arguments(template)
    template = template.replace("not in ['system', 'developer']", "!= 'system'")
    return template.replace("in ['system', 'developer']", "== 'system'")


def test_openai_messages_render_as_vllm_and_llama_cpp_render_them(tok: Tokenizer, tmp_path: Path) -> None:
    """What vLLM (and llama.cpp's server) hand the saved template: the `developer` role as it came (the
    template refused it, a 400 where nanoseek serve took it as the system role), and text parts joined
    by newlines before the template sees them (nanoseek joined them with nothing: another prompt).
    A tokenizer saved with the template before still loads as ours."""
    from transformers import AutoTokenizer

    from nanoseek.tokenizer import openai_message

    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}]
    request = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}]
    vllm = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "What is\n2 + 2?"}]
    served = tok.apply_chat_template([openai_message(m) for m in request])
    assert served == f"{BOS}Be brief.{USER}What is\n2 + 2?{ASSISTANT}{THINK_START}\n"
    assert hf.apply_chat_template(vllm, add_generation_prompt=True, tokenize=False) == served
    assert tok.apply_chat_template(vllm) == served  # developer as is: the system role here too
    before = _refusing_developer(R1_CHAT_TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": before}))
    assert load_tokenizer(tmp_path).chat_template == R1_CHAT_TEMPLATE


def test_foreign_template_renders_as_transformers_does(tok: Tokenizer, tmp_path: Path) -> None:
    """transformers' `tojson` takes `separators` and `sort_keys` (Kimi-K2's template writes its tools
    with `tojson(separators=(',', ':'))`: they came out spaced), and its `{% generation %}` tag (TRL's
    assistant masks) renders as its body (it was a jinja2 syntax error)."""
    from transformers import AutoTokenizer

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": "é"}}}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for template in (
        "{{ tools | tojson(separators=(',', ':')) }}{{ tools | tojson(sort_keys=True, indent=1) }}",
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
        "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}",
    ):
        Tokenizer(tok.backend, chat_template=template).save(tmp_path)
        theirs = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(
            messages, tools=tools, tokenize=False
        )
        assert load_tokenizer(tmp_path).apply_chat_template(messages, tools=tools) == theirs


# nanoseek's template before tool calls and the non-thinking mode, as older tokenizer_config.json files hold it
TEMPLATE_BEFORE_TOOLS = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}"
    "{%- endif %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] or '' %}"
    "{%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] != 'system' %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)


def test_tokenizer_without_tool_tokens(tok: Tokenizer, tmp_path: Path) -> None:
    """A tokenizer trained before the tool tokens (and its older saved template) still chats; tool use
    is refused with an error that says why."""

    from nanoseek.tokenizer import TOOL_TOKENS

    spec = json.loads(tok.backend.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in TOOL_TOKENS]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE_BEFORE_TOOLS}))
    old = load_tokenizer(tmp_path)
    assert old.chat_template == R1_CHAT_TEMPLATE  # recognised as ours, upgraded
    assert old.missing_tool_tokens == TOOL_TOKENS
    for messages in CONVERSATIONS:
        assert old.apply_chat_template(messages) == tok.apply_chat_template(messages)
    assert old.apply_chat_template(CONVERSATIONS[0], thinking=False).endswith(THINK_END)
    with pytest.raises(ValueError, match="no tool-call tokens"):
        old.apply_chat_template(CONVERSATIONS[0], tools=[WEATHER])
    with pytest.raises(ValueError, match="no tool-call tokens"):
        old.apply_chat_template(TOOL_CONVERSATION)
    assert tok.missing_tool_tokens == ()
    # another family's template (Qwen2.5's writes tools as <tool_call> text) renders tool data its own
    # way, for SFT on it; only the DeepSeek tool parsing (serve) needs the tokens, and says so
    chatml_tools = (
        "{% if tools %}# Tools{% for t in tools %} {{ t.function.name }}{% endfor %}\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    qwen = Tokenizer(old.backend, chat_template=chatml_tools)
    assert qwen.apply_chat_template(CONVERSATIONS[0], tools=[WEATHER]).startswith("# Tools get_weather")
    with pytest.raises(ValueError, match="another family's"):
        qwen.require_tool_tokens()


def test_lone_surrogate_is_a_clear_value_error(tok) -> None:
    # Python holds undecodable bytes (surrogateescape) and JSON's lone \ud83d as such strings; the
    # Rust tokenizer refused them with a bare TypeError
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode("hi \udce9")
    with pytest.raises(ValueError, match="surrogate"):
        tok.encode_batch(["ok", "\ud83d"])


def test_save_replaces_each_file_whole(tok, tmp_path, monkeypatch) -> None:
    # a kill while saving left a torn tokenizer.json that every later load (an ablation's resume) failed on
    tok.save(tmp_path)
    before = (tmp_path / "tokenizer.json").read_bytes()

    def torn(path: str) -> None:
        Path(path).write_text('{"version": "1.0", "trunc')
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tok.backend), "save", lambda self, path, *a: torn(path), raising=False)
    with pytest.raises(KeyboardInterrupt):
        tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_a_failed_save_is_an_os_error_naming_the_file(tok, tmp_path, monkeypatch) -> None:
    """The Rust backend reports a full or read-only disk as a bare `Exception` (its message below, as a
    full tmpfs gives it): `nanoseek tokenizer train` and `pretrain` ended in a traceback."""
    import errno

    def full(path: str) -> None:
        Path(path).write_text('{"version": "1.0", "trunc')
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(type(tok.backend), "save", lambda self, path, *a: full(path), raising=False)
    with pytest.raises(OSError, match="No space left on device") as e:
        tok.save(tmp_path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "tokenizer.json")
    assert list(tmp_path.iterdir()) == []


def test_cli_trains_on_the_embedded_corpus_of_chosen_families(tmp_path: Path) -> None:
    # `--data embedded:TASKS` is a source as in `pretrain --data`, not a file name
    from nanoseek.cli import main

    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--data",
                "embedded:arithmetic",
                "--max-docs",
                "200",
                "--vocab-size",
                "400",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "tokenizer.json").exists()


def test_load_reads_the_config_as_utf8_whatever_the_locale(tok: Tokenizer, tmp_path: Path) -> None:
    """tokenizer_config.json is written as UTF-8 (the template's <｜User｜> is not ASCII); reading it with
    the locale's encoding failed under LANG=C (ascii) and garbled it under cp1252 (Windows)."""
    import os
    import subprocess
    import sys

    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{{ '<｜User｜>' + messages[0]['content'] }}", encoding="utf-8"
    )
    code = (
        "import json, sys; from nanoseek.tokenizer import load_tokenizer; t = load_tokenizer(sys.argv[1]);"
        " print(json.dumps(t.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False)))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LC_")}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-500:]
    assert "<｜User｜>hi" in json.loads(r.stdout)


def test_chat_template_jinja_is_read_over_the_config_entry_as_transformers_reads_it(
    tok: Tokenizer, tmp_path: Path
) -> None:
    """transformers (and so vLLM) take chat_template.jinja over tokenizer_config.json's chat_template:
    a checkpoint whose template was edited in that file was served by nanoseek with the stale one."""
    from transformers import AutoTokenizer

    tok.save(tmp_path)  # the config holds R1's template
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    )
    msgs = [{"role": "user", "content": "hi"}]
    theirs = AutoTokenizer.from_pretrained(str(tmp_path)).apply_chat_template(msgs, tokenize=False)
    assert load_tokenizer(tmp_path).apply_chat_template(msgs) == theirs == "[user]hi"


def test_a_chat_template_jinja_not_in_utf8_is_refused_naming_the_file(tok: Tokenizer, tmp_path: Path) -> None:
    """A chat_template.jinja saved in Latin-1 (or damaged) was the codec's error alone, naming no file."""
    tok.save(tmp_path)
    (tmp_path / "chat_template.jinja").write_bytes(b"{{ messages[0]['content'] }} caf\xe9")
    with pytest.raises(ValueError, match=r"chat_template\.jinja is not UTF-8 text: 'utf-8' codec"):
        load_tokenizer(tmp_path)


def test_generation_config_eos_ids_also_stop_generation(tok: Tokenizer, tmp_path: Path) -> None:
    # Llama 3.1 and Qwen2.5-Instruct name several end ids there: transformers' generate and vLLM stop on
    # each, so a chat with such a checkpoint must not run on past <|eom_id|> / <|endoftext|>.
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).stop_token_ids == (tok.eos_token_id,)
    other = tok.token_to_id(USER)
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [tok.eos_token_id, other, 10**9]})
    )
    assert load_tokenizer(tmp_path).stop_token_ids == (
        tok.eos_token_id,
        other,
    )  # ids outside the vocabulary dropped
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": other}))
    assert load_tokenizer(tmp_path).stop_token_ids == (tok.eos_token_id, other)
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="generation_config.json is not a JSON object"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("tokenizer_config.json", b"[]", "is not a JSON object: it holds an array"),  # an AttributeError
        ("tokenizer_config.json", b'{"eos_token": "\xff"}', "is not valid JSON: 'utf-8' codec"),
        ("generation_config.json", b'{"temperature": 0.6\xff}', "is not valid JSON: 'utf-8' codec"),
    ],
)
def test_a_damaged_tokenizer_or_generation_config_is_named(
    tok: Tokenizer, tmp_path: Path, name: str, text: bytes, message: str
) -> None:
    """Not a JSON object (a `.get` on a list deep inside the loader), or not UTF-8 (a codec error that
    named no file)."""
    tok.save(tmp_path)
    (tmp_path / name).write_bytes(text)
    with pytest.raises(ValueError, match=rf"{name} {message}"):
        load_tokenizer(tmp_path)


def test_a_config_whose_bos_token_is_null_puts_nothing_before_a_prompt(tmp_path):
    """Qwen2.5's tokenizer_config.json says `"bos_token": null`: transformers puts no token before a
    prompt, where nanoseek took <|endoftext|> as BOS and prepended it to every `generate` prompt."""
    import transformers

    from model_configs import chatml_tokenizer
    from nanoseek.tokenizer import load_tokenizer

    chatml_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tok.add_bos_token is False
    assert tok.encode("hi there", add_bos=tok.add_bos_token) == hf("hi there").input_ids


def test_enable_thinking_is_taken_as_transformers_takes_it(tok: Tokenizer, tmp_path: Path) -> None:
    """`enable_thinking=False` (vLLM's and Qwen3's name, what transformers passes to any template) was a
    TypeError here; it is the same switch as `thinking`, which wins where both are given, as in the
    template."""
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    msgs = CONVERSATIONS[0]
    for kw in (
        {"enable_thinking": False},
        {"enable_thinking": True},
        {"thinking": True, "enable_thinking": False},
    ):
        theirs = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kw)
        theirs = list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
        assert tok.apply_chat_template(msgs, tokenize=True, **kw) == theirs, kw
    assert tok.apply_chat_template(msgs, enable_thinking=False) == tok.apply_chat_template(
        msgs, thinking=False
    )
    # another family's template (Qwen3's switch) reads it too
    qwen3 = Tokenizer(
        tok.backend,
        chat_template="{% if enable_thinking is defined and enable_thinking is false %}no-think{% endif %}",
    )
    assert qwen3.apply_chat_template(msgs, enable_thinking=False) == "no-think"
    assert qwen3.apply_chat_template(msgs) == ""


# Llama-3.1-Instruct's tokenizer_config.json chat template, its message loop (tool calls, tool results)
LLAMA31_TURNS = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "        {{- '\"parameters\": ' }}\n"
    "        {{- tool_call.arguments | tojson }}\n"
    '        {{- "}" }}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {{- message.content | tojson }}\n"
    '        {{- "<|eot_id|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


def test_null_message_fields_render_as_in_transformers(tmp_path: Path) -> None:
    """A message's null fields are left out, as transformers leaves them out: chats saved with the OpenAI
    SDK's model_dump carry `"tool_calls": null` on every answer, and Llama 3.1's template (which asks
    `'tool_calls' in message`) failed on them with "object of type 'NoneType' has no len()"."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers
    from transformers import AutoTokenizer

    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    words = ["user", "assistant", "ipython", "hi", "hello", "[UNK]"]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(specials)
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA31_TURNS}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    msgs = [
        {"role": "user", "content": "hi", "name": None},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "hello"},
        {"role": "assistant", "content": "hello", "tool_calls": None, "refusal": None},
        {"role": "user", "content": "hi"},
    ]
    theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )
    assert load_tokenizer(tmp_path).apply_chat_template(msgs) == theirs
    assert "hello<|eot_id|><|start_header_id|>user" in theirs


def test_a_null_bos_token_gives_a_chat_template_none_and_is_saved_null(tmp_path: Path) -> None:
    """Qwen2.5's `"bos_token": null`: transformers gives a template no `bos_token`, so `{{ bos_token }}`
    renders nothing; nanoseek gave it the <|endoftext|> it falls back on (a token in front of every
    prompt), and saved that fallback as the BOS, so the checkpoint it wrote rendered it in transformers too."""
    from transformers import AutoTokenizer

    from model_configs import CHATML, chatml_tokenizer

    chatml_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ bos_token }}" + CHATML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    msgs = [{"role": "user", "content": "hi"}]
    theirs = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )
    tok = load_tokenizer(tmp_path)
    assert (
        tok.apply_chat_template(msgs) == theirs == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    out = tmp_path / "saved"
    out.mkdir()
    tok.save(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["bos_token"] is None
    assert load_tokenizer(out).apply_chat_template(msgs) == theirs
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == theirs  # fmt: skip
