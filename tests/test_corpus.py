"""Corpora and packing: file formats, globs and directories, packing boundaries, validation split,
deterministic shuffling, exact resume, data-parallel slicing."""

from __future__ import annotations

import gzip
import importlib.util
import io
import itertools
import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data.corpus import (
    PackedDataset,
    in_validation_split,
    iter_documents,
    tokenizer_documents,
    window_tokens,
)
from nanoseek.data.files import resolve_files
from nanoseek.tokenizer import Tokenizer, train_tokenizer

# the `corpus` fixture holds a notes.csv a folder scan leaves out, and says so at every scan
pytestmark = pytest.mark.filterwarnings("ignore:.*left out of the data:UserWarning")

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "and",
    "猫",
    "が",
    "座った",
    "。",
    "我们",
    "计算",
    "12",
    "345",
    "+",
    "=",
    "😀",
    "answer",
]


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40))) for i in range(n)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(_docs(300, seed=99), vocab_size=400)


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """A directory with every supported format; returns it and its documents in reading order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(500)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    with open(root / "a.jsonl", "w") as f:
        for d in docs[:150]:
            f.write(json.dumps({"text": d, "meta": 1}, ensure_ascii=False) + "\n\n")  # blank lines skipped
    # Separator lines split a .txt into documents.
    (root / "b.txt").write_text(
        "\n<|endoftext|>\n".join(d + "\n" for d in docs[150:250]).replace("\n\n", "\n")
    )
    pq.write_table(
        pa.table({"text": docs[250:450], "id": list(range(200))}), root / "c.parquet", row_group_size=33
    )
    with gzip.open(root / "sub" / "d.jsonl.gz", "wt") as f:
        for d in docs[450:499]:
            f.write(json.dumps({"text": d}) + "\n")
    (root / "sub" / "e.txt").write_text(docs[499])  # no separator: the whole file is one document
    (root / "notes.csv").write_text("ignored,by,directory,scan")
    return root, docs


def _norm(texts: list[str]) -> list[str]:
    return [t.strip() for t in texts]


# ------------------------------------------------------------------ documents
def test_iter_documents_all_formats(corpus: tuple[Path, list[str]]) -> None:
    root, docs = corpus
    assert _norm(list(iter_documents(root))) == docs  # directory: recursive, sorted by path
    assert _norm(list(iter_documents(str(root / "*.parquet")))) == docs[250:450]
    assert _norm(list(iter_documents([root / "sub" / "e.txt", root / "a.jsonl"]))) == [docs[499], *docs[:150]]
    assert list(iter_documents(str(root / "**" / "*.gz"))) == docs[450:499]
    assert [p.name for p in resolve_files(root)] == ["a.jsonl", "b.txt", "c.parquet", "d.jsonl.gz", "e.txt"]


def test_iter_documents_is_streamed(tmp_path: Path) -> None:
    # A huge single-document .txt is cut at line boundaries instead of being read whole.
    big = tmp_path / "big.txt"
    big.write_text("".join(f"line {i}\n" for i in range(5000)))
    chunks = list(iter_documents(big, max_doc_chars=1000))
    assert "".join(chunks) == big.read_text() and max(len(c) for c in chunks) < 1100


def test_iter_documents_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        list(iter_documents(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        list(iter_documents(str(tmp_path / "*.jsonl")))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(iter_documents(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"content": "hi"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl.*no field 'text'.*content"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    assert list(iter_documents(tmp_path / "bad.jsonl", text_field="content")) == ["hi"]
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="invalid JSON"):
        list(iter_documents(tmp_path / "broken.jsonl"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="no column 'text'.*body"):
        list(iter_documents(tmp_path / "p.parquet"))
    # not parquet (a download cut short, an HTML error page): pyarrow's error named no file
    (tmp_path / "page.parquet").write_text("<html>rate limited</html>")
    with pytest.raises(ValueError, match=r"page\.parquet is not a readable parquet file \(.*magic bytes"):
        list(iter_documents(tmp_path / "page.parquet"))


# ------------------------------------------------------------------ packing
def test_packing_boundaries_no_token_lost_or_duplicated(
    corpus: tuple[Path, list[str]], tok: Tokenizer
) -> None:
    root, _ = corpus
    seq_len, bsz = 16, 3
    ds = PackedDataset(root, tok, seq_len, bsz, split="train", val_fraction=0.0, shuffle=False, repeat=False)
    batches = list(ds)
    stream: list[int] = []
    for doc in iter_documents(root):
        stream += [tok.bos_token_id, *tok.encode(doc)]
    windows = torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y in batches])  # rebuild [N, S+1]
    assert windows.shape[1] == seq_len + 1
    for x, y in batches:
        assert x.dtype == torch.long and x.shape == y.shape == (bsz, seq_len)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    flat = windows.flatten().tolist()
    # Windows tile the BOS-separated stream exactly; only the tail that fills no full batch is dropped.
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) < bsz * (seq_len + 1)
    assert flat[0] == tok.bos_token_id and flat.count(tok.bos_token_id) == stream[: len(flat)].count(
        tok.bos_token_id
    )


def test_one_long_text_is_split_piece_by_piece(tmp_path: Path) -> None:
    """A corpus of one book: its max_doc_chars pieces go to either split by their own hash (as nanoGPT
    splits one text file), so validation is not empty and holds no piece that training reads."""
    book = " ".join(f"word{i}" for i in range(3000))  # ~26k characters, one record
    (tmp_path / "book.jsonl").write_text(json.dumps({"text": book}) + "\n")
    pieces = list(iter_documents(tmp_path / "book.jsonl", max_doc_chars=1000))
    assert len(pieces) > 20 and "".join(pieces).split() == book.split()
    val = [p for p in pieces if in_validation_split(p, 0.3)]
    assert 0 < len(val) < len(pieces)


def test_validation_split_is_disjoint_and_stable(
    corpus: tuple[Path, list[str]], tok: Tokenizer, tmp_path: Path
) -> None:
    root, _ = corpus
    docs = list(iter_documents(root))  # the split is decided on the text exactly as read
    val_docs = [d for d in docs if in_validation_split(d, 0.1)]
    assert 20 <= len(val_docs) <= 80  # about 1 in 10

    def split_docs(split: str) -> list[str]:
        ds = PackedDataset(root, tok, 32, 1, split=split, val_fraction=0.1, shuffle=False, repeat=False)
        ids = [t for x, y in ds for t in x[0].tolist() + y[0, -1:].tolist()]
        return tok.decode(ids).split(tok.bos_token)[1:]

    val, train = split_docs("val"), split_docs("train")
    expected_train = [d for d in docs if d not in val_docs]
    # Every document lands in exactly one split; only the last, partly filled window is dropped.
    assert val[:-1] == val_docs[: len(val) - 1] and len(val) >= len(val_docs) - 2
    assert train[:-1] == expected_train[: len(train) - 1]
    assert len(train) >= len(expected_train) - 2
    with pytest.raises(ValueError, match="no documents in the val split.*--val-fraction 1e-09.*endoftext"):
        list(PackedDataset(root / "sub" / "e.txt", tok, 8, 1, split="val", val_fraction=1e-9))
    # a corpus with no text at all (a column of nulls) is said so, not blamed on the split's hash
    (tmp_path / "nulls.jsonl").write_text('{"text": null}\n{"text": "  "}\n')
    for split, repeat in (("train", True), ("val", False)):
        with pytest.raises(ValueError, match=r"nulls\.jsonl.*: every text in it is empty or null"):
            list(PackedDataset(tmp_path / "nulls.jsonl", tok, 8, 1, split=split, repeat=repeat))


def test_shuffle_is_deterministic_by_seed(corpus: tuple[Path, list[str]], tok: Tokenizer) -> None:
    root, _ = corpus

    def first(seed: int) -> list[torch.Tensor]:
        ds = PackedDataset(root, tok, 16, 4, seed=seed, shuffle_buffer=32)
        return [x for x, _ in itertools.islice(ds, 6)]

    a, b, c = first(0), first(0), first(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    plain = PackedDataset(root, tok, 16, 4, shuffle=False)
    assert not all(torch.equal(x, y) for x, (y, _) in zip(a, plain, strict=False))


# Mid-file in a big corpus; and in a small one, after several epochs (each with its own file order).
@pytest.mark.parametrize(("sub", "skip"), [("", 3), ("c.parquet", 25), ("sub", 40)])
def test_resume_continues_exactly(
    corpus: tuple[Path, list[str]], tok: Tokenizer, sub: str, skip: int
) -> None:
    root, _ = corpus

    def make() -> PackedDataset:
        return PackedDataset(
            root / sub, tok, 24, 4, seed=7, shuffle_buffer=16, val_fraction=0.05, tokenize_batch=8
        )

    reference = list(itertools.islice(make(), skip + 12))
    ds = make()
    it = iter(ds)
    for _ in range(skip):
        next(it)
    # The state survives torch.save / torch.load(weights_only=True), as in a checkpoint's train_state/.
    buf = io.BytesIO()
    torch.save(ds.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    resumed = make()
    resumed.load_state_dict(state)
    after = list(itertools.islice(resumed, 12))
    for (x, y), (rx, ry) in zip(reference[skip:], after, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    if sub == "sub":
        assert state["cursor"][0] >= 2  # the small corpus was read several times
    if sub == "c.parquet":
        assert 33 < state["cursor"][2] < 200  # a row inside a later row group


def test_resume_rejects_changed_settings(corpus: tuple[Path, list[str]], tok: Tokenizer) -> None:
    root, _ = corpus
    ds = PackedDataset(root, tok, 16, 2)
    next(iter(ds))
    other = PackedDataset(root, tok, 32, 2)
    with pytest.raises(ValueError, match="seq_len"):
        other.load_state_dict(ds.state_dict())


def test_resume_of_a_cut_position_with_whole_documents_names_the_flag(
    corpus: tuple[Path, list[str]], tok: Tokenizer
) -> None:
    """A position saved cutting documents (every run before whole-document packing was the default)
    resumed with today's default says which flag resumes it."""
    root, _ = corpus
    cut = PackedDataset(root, tok, 16, 2)
    next(iter(cut))
    with pytest.raises(ValueError, match="whole_documents: None -> True.*resume with --cut-documents"):
        PackedDataset(root, tok, 16, 2, whole_documents=True).load_state_dict(cut.state_dict())


def test_ranks_split_the_global_batch(corpus: tuple[Path, list[str]], tok: Tokenizer) -> None:
    root, _ = corpus
    whole = list(itertools.islice(PackedDataset(root, tok, 16, 4, seed=3, shuffle_buffer=8), 5))
    r0 = list(itertools.islice(PackedDataset(root, tok, 16, 2, seed=3, shuffle_buffer=8, world_size=2), 5))
    r1 = list(
        itertools.islice(PackedDataset(root, tok, 16, 2, seed=3, shuffle_buffer=8, rank=1, world_size=2), 5)
    )
    for (x, _), (a, _), (b, _) in zip(whole, r0, r1, strict=True):
        assert torch.equal(x, torch.cat([a, b]))


def test_bad_arguments(corpus: tuple[Path, list[str]], tok: Tokenizer) -> None:
    root, _ = corpus
    with pytest.raises(ValueError, match="split"):
        PackedDataset(root, tok, 16, 2, split="test")
    with pytest.raises(ValueError, match="rank"):
        PackedDataset(root, tok, 16, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="val_fraction"):
        PackedDataset(root, tok, 16, 2, split="val", val_fraction=0)


# ------------------------------------------------------------------ embedded corpus
@pytest.mark.skipif(
    importlib.util.find_spec("nanoseek.data.synthetic") is None, reason="embedded corpus not built yet"
)
def test_embedded_corpus(tok: Tokenizer) -> None:
    docs = list(itertools.islice(iter_documents("embedded"), 50))
    assert len(docs) == 50 and all(isinstance(d, str) and d.strip() for d in docs)
    assert docs == list(itertools.islice(iter_documents(None), 50))  # reproducible; None = embedded
    assert docs != list(itertools.islice(iter_documents("embedded", seed=1), 50))

    def make(split: str = "train") -> PackedDataset:
        return PackedDataset("embedded", tok, 32, 2, split=split, shuffle_buffer=8, val_fraction=0.05)

    ds = make()
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = ds.state_dict()
    expected = [next(it) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(state)
    for (x, _), (rx, _) in zip(expected, itertools.islice(resumed, 3), strict=True):
        assert torch.equal(x, rx)
    # Validation reads the corpus's held-out problems (its "test" stream), never the training stream.
    from nanoseek.data.synthetic import iter_documents as synthetic_documents

    val_x, _ = next(iter(make("val")))
    assert val_x.shape == (2, 32) and val_x[0, 0] == tok.bos_token_id
    held_out = next(synthetic_documents(seed=0, split="test"))
    assert val_x[0, 1:].tolist() == tok.encode(held_out)[:31]


def test_embedded_corpus_of_chosen_families(tok: Tokenizer) -> None:
    from nanoseek.data.synthetic import iter_documents as synthetic_documents

    docs = list(itertools.islice(iter_documents("embedded:counting,comparison"), 40))
    assert docs == list(itertools.islice(synthetic_documents(seed=0, tasks=["counting", "comparison"]), 40))
    assert docs != list(itertools.islice(iter_documents("embedded"), 40))
    ds = PackedDataset("embedded:counting,comparison", tok, 32, 2, split="train", shuffle_buffer=4)
    assert ds.state_dict()["fingerprint"]["source"] == "embedded:counting,comparison"
    with pytest.raises(ValueError, match="no task"):
        list(itertools.islice(iter_documents("embedded:"), 1))
    with pytest.raises(ValueError, match="unknown task"):
        list(itertools.islice(iter_documents("embedded:nonsense"), 1))


def test_tokenizer_documents_leave_out_spelled_strings(corpus: tuple[Path, list[str]]) -> None:
    """A tokenizer trained on the embedded corpus learns no merges from a counting problem's random
    letters, so the model reads them letter by letter, as it reads digits."""
    from nanoseek.data.synthetic import iter_documents as synthetic_documents

    root, docs = corpus
    assert list(itertools.islice(tokenizer_documents(root), 50)) == docs[:50]  # files: as they are
    source = "embedded:counting,comparison"
    plain = list(itertools.islice(iter_documents(source), 300))
    blanked = list(itertools.islice(tokenizer_documents(source), 300))
    assert blanked == list(
        itertools.islice(synthetic_documents(tasks=["counting", "comparison"], blank_spelled=True), 300)
    )
    assert [a == b for a, b in zip(plain, blanked, strict=True)].count(False) > 100
    tok = train_tokenizer(blanked, vocab_size=400)
    merged = train_tokenizer(plain, vocab_size=400)
    text = "cabbadcdbacd"
    assert len(tok.encode(text)) > len(merged.encode(text)) and len(tok.encode(text)) >= 10


def test_whole_document_packing(corpus: tuple[Path, list[str]], tok: Tokenizer) -> None:
    """Each document lands whole in one window (unless longer than a window), every token exactly once,
    the rest of a window padded with nothing to predict; resume stays exact."""
    root, _ = corpus
    seq = 48
    ds = PackedDataset(
        root, tok, seq, 1, val_fraction=0.0, shuffle=False, repeat=False, whole_documents=True, lookahead=8
    )
    bos, pad = tok.bos_token_id, tok.pad_token_id
    pieces: list[tuple[int, ...]] = []
    for x, y in ds:
        x, y = x[0].tolist(), y[0].tolist()
        n = sum(t != -100 for t in y)  # real tokens: n + 1, then padding
        assert all(t != -100 for t in y[:n]) and all(t == pad for t in x[n + 1 :])
        assert window_tokens(torch.tensor([x]), pad).sum() == min(n + 1, seq)  # what routing balances
        real = x[: n + 1] if n < seq else x + [y[-1]]
        starts = [i for i, t in enumerate(real) if t == bos] or [0]
        if starts[0] != 0:
            starts.insert(0, 0)  # the rest of a document longer than a window
        pieces += [tuple(real[a:b]) for a, b in zip(starts, [*starts[1:], len(real)], strict=True)]
    encoded = [(bos, *ids) for ids in tok.encode_batch(list(iter_documents(root)))]
    short = [e for e in encoded if len(e) <= seq + 1]
    assert sorted(p for p in pieces if p[0] == bos and len(p) <= seq + 1 and p in set(short)) == sorted(short)
    assert sum(map(len, pieces)) == sum(map(len, encoded))  # nothing dropped, nothing repeated
    # only documents longer than a window are cut, each into as few pieces as possible
    assert len(pieces) == sum(-(-len(e) // (seq + 1)) for e in encoded)

    def make() -> PackedDataset:
        return PackedDataset(
            root, tok, 24, 4, seed=7, shuffle_buffer=16, val_fraction=0.05, whole_documents=True, lookahead=6
        )

    reference = list(itertools.islice(make(), 20))
    partial = make()
    it = iter(partial)
    for _ in range(8):
        next(it)
    resumed = make()
    resumed.load_state_dict(partial.state_dict())
    for (x, y), (rx, ry) in zip(reference[8:], itertools.islice(resumed, 12), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_prompt_tokens_carry_no_loss(tok: Tokenizer, tmp_path: Path) -> None:
    """mask_prompts: in chat documents the user turn predicts nothing; the response and plain text do."""
    from nanoseek.data.synthetic import ASSISTANT, EOS, USER

    docs = [f"{USER}What is 2 + 3?{ASSISTANT}<think>\n2 + 3 = 5\n</think>\n5{EOS}", "plain text 12 + 30 = 42"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ds = PackedDataset(
        tmp_path / "c.jsonl",
        tok,
        64,
        1,
        val_fraction=0.0,
        shuffle=False,
        repeat=False,
        whole_documents=True,
        mask_prompts=True,
    )
    x, y = next(iter(ds))
    x, y = x[0].tolist(), y[0].tolist()
    user, asst = tok.token_to_id(USER), tok.token_to_id(ASSISTANT)
    i_user, i_asst = x.index(user), x.index(asst)
    assert all(t == -100 for t in y[i_user : i_asst - 1])  # the prompt's tokens are never targets
    assert y[i_asst - 1] == asst and y[i_asst] == tok.token_to_id("<think>")  # the response is
    second = x.index(tok.bos_token_id, 1)
    assert all(t != -100 for t in y[second : second + 5])  # plain documents keep their loss


def test_earlier_answers_of_a_reasoning_chat_carry_no_loss(tok: Tokenizer, tmp_path: Path) -> None:
    """mask_prompts: in a chat whose last answer reasons, the earlier answers (their reasoning dropped,
    as the template renders a chat's history) predict nothing; a chat without reasoning keeps them."""
    from nanoseek.data.synthetic import ASSISTANT, EOS, USER

    reasoning = f"{USER}What is 4 + 4?{ASSISTANT}\n8{EOS}{USER}What is 2 + 3?{ASSISTANT}<think>\n2 + 3 = 5\n</think>\n5{EOS}"
    plain_chat = f"{USER}Hi there{ASSISTANT}Hello, how can I help?{EOS}{USER}Thanks{ASSISTANT}Bye now{EOS}"
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in (reasoning, plain_chat))
    )
    ds = PackedDataset(
        tmp_path / "c.jsonl", tok, 96, 1, val_fraction=0.0, shuffle=False, repeat=False,
        whole_documents=True, mask_prompts=True,
    )  # fmt: skip
    x, y = next(iter(ds))
    x, y = x[0].tolist(), y[0].tolist()
    asst, eos, think = tok.token_to_id(ASSISTANT), tok.token_to_id(EOS), tok.token_to_id("<think>")
    first, second = [i for i, t in enumerate(x) if t == asst][:2]
    assert all(t == -100 for t in y[first : x.index(eos) + 1])  # "\n8" and its end: no target
    assert y[second - 1] == asst and y[second] == think  # the reasoning answer is trained
    assert all(t != -100 for t in y[second : x.index(eos, second)])
    other = x.index(tok.bos_token_id, 1)
    answers = [i for i, t in enumerate(x) if t == asst and i > other]
    for a in answers:  # no reasoning anywhere in that chat: both its answers keep their loss
        assert all(t != -100 for t in y[a : x.index(eos, a)])


def test_a_tool_chat_trains_on_what_sft_trains_on(tok: Tokenizer, tmp_path: Path) -> None:
    """mask_prompts on a rendered tool-use chat: the system prompt (with its tool list) and the tool's
    result predict nothing, as in SFT; the model's tool call and its answer after the result do."""
    from nanoseek.train.sft import tokenize_conversation

    tools = [
        {"type": "function", "function": {"name": "weather", "description": "the weather", "parameters": {}}}
    ]
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "system", "content": "You are the cat on the mat."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny 12 345"},
        {"role": "assistant", "content": "and the answer is 5"},
    ]
    chat = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=False)
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": chat}) + "\n")
    ds = PackedDataset(
        tmp_path / "c.jsonl", tok, 512, 1, val_fraction=0.0, shuffle=False, repeat=False,
        whole_documents=True, mask_prompts=True,
    )  # fmt: skip
    trained = tok.decode([t for _, y in ds for t in y[0].tolist() if t >= 0])
    sft = "".join(
        tok.decode([t for t in y if t >= 0]) for _, y in tokenize_conversation(tok, messages, tools)
    )
    for text in ('weather<｜tool▁sep｜>{"city": "Paris"}', "and the answer is 5"):
        assert text in trained and text in sft
    for text in ("the cat on the mat", "## Tools", "2 + 3", "sunny 12 345"):
        assert text not in trained and text not in sft


@pytest.mark.parametrize("whole_documents", [False, True])
def test_a_document_that_opens_with_bos_gets_no_second(
    tok: Tokenizer, tmp_path: Path, whole_documents
) -> None:
    """A chat rendered by apply_chat_template opens with BOS: it is the document's one BOS, as at
    inference, not BOS BOS (a target of BOS after BOS, and a lone BOS packed away from its document)."""
    chats = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False) for q in ("hi", "ho")]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in [*chats, "plain text"]))
    ds = PackedDataset(
        tmp_path / "c.jsonl", tok, 8, 1, val_fraction=0.0, shuffle=False, repeat=False,
        whole_documents=whole_documents,
    )  # fmt: skip
    inputs = [t for x, _ in ds for t in x[0].tolist()]
    bos = tok.bos_token_id
    assert inputs.count(bos) == 3 and all(a != bos or b != bos for a, b in itertools.pairwise(inputs))


@pytest.mark.parametrize("whole_documents", [False, True])
def test_a_chat_cut_across_windows_keeps_its_mask_in_each(
    tok: Tokenizer, tmp_path: Path, whole_documents
) -> None:
    """mask_prompts on a chat longer than a window (or cut at a window's edge): the prompt's part in
    the next window, which has no <｜User｜> of its own, predicts nothing either; every answer token
    (an earlier one of a reasoning chat aside) is still a target, wherever the cut falls."""
    from nanoseek.data.synthetic import ASSISTANT, EOS, USER

    prompt = "What is 2 + 3 and then 4 + 5 and then 7 + 8 plus nine, please?"
    docs = [
        f"{USER}What is 4 + 4?{ASSISTANT}\n8{EOS}{USER}{prompt}{ASSISTANT}<think>\n2 + 3 = 5\n</think>\n5{EOS}",
        "plain text 12 + 30 = 42",
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    def targets(seq_len: int, whole_documents: bool = whole_documents) -> list[int]:
        ds = PackedDataset(
            tmp_path / "c.jsonl", tok, seq_len, 1, val_fraction=0.0, shuffle=False, repeat=False,
            whole_documents=whole_documents, mask_prompts=True,
        )  # fmt: skip
        return [t for _, y in ds for t in y[0].tolist() if t != -100]

    whole = targets(256, whole_documents=True)  # one window holds it all: the mask over the whole chat
    assert tok.decode(whole).count("What") == 0 and "</think>" in tok.decode(whole)
    for seq_len in (9, 16, 23):
        cut = targets(seq_len)  # the tokens at the windows' edges are no targets: a subsequence
        it = iter(whole)
        assert all(t in it for t in cut), seq_len
        assert len(cut) >= len(whole) - 2 * (len(tok.encode("".join(docs))) // seq_len + 2)


@pytest.mark.parametrize("whole_documents", [False, True])
def test_a_chat_that_ends_on_a_question_masks_nothing_past_its_document(
    tok: Tokenizer, tmp_path: Path, whole_documents
) -> None:
    """mask_prompts on a document that ends inside a user turn (a chat cut after a question): the user
    turn ends with it. The documents after it are targets, and whole-document packing still finds where
    each starts (a masked BOS was hidden from it, and a document was cut in two)."""
    from nanoseek.data.synthetic import USER

    docs = [f"{USER}a question with no answer yet", "plain text twelve plus thirty is forty two", "more text"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ds = PackedDataset(
        tmp_path / "c.jsonl", tok, 64, 1, val_fraction=0.0, shuffle=False, repeat=False,
        whole_documents=whole_documents, mask_prompts=True,
    )  # fmt: skip
    batches = [(x[0].tolist(), y[0].tolist()) for x, y in ds]
    trained = tok.decode([t for _, y in batches for t in y if t >= 0])
    assert "question" not in trained and "plain text twelve plus thirty" in trained
    if whole_documents:  # every document whole in one window, and trained
        assert docs[1] in trained and docs[2] in trained
        inputs = [tok.decode(x) for x, _ in batches]
        assert all(sum(d in text for text in inputs) == 1 for d in docs), inputs


def test_the_embedded_corpus_asks_several_questions_in_a_chat_when_told(tok: Tokenizer) -> None:
    """`multi_turn` reaches the embedded corpus, and is part of the data position a resume checks."""
    from nanoseek.data.synthetic import EOS, USER

    def make(multi_turn: float) -> PackedDataset:
        return PackedDataset(
            "embedded:addition,comparison", tok, 256, 4, whole_documents=True, multi_turn=multi_turn
        )

    def questions_after_an_answer(ds: PackedDataset) -> int:  # a user turn right after an end of sentence
        eos, user = tok.token_to_id(EOS), tok.token_to_id(USER)
        return sum(((x[:, :-1] == eos) & (x[:, 1:] == user)).sum().item() for x, _ in itertools.islice(ds, 4))

    assert questions_after_an_answer(make(0.0)) == 0 < questions_after_an_answer(make(0.5))
    for saved, now in ((0.5, 0.0), (0.0, 0.5), (0.5, 0.3)):
        with pytest.raises(ValueError, match="multi_turn"):
            make(now).load_state_dict(make(saved).state_dict())


# ------------------------------------------------------------------ small and long corpora
def test_a_corpus_smaller_than_one_tokenize_batch_trains(tmp_path: Path, tok: Tokenizer) -> None:
    # 5 documents (< tokenize_batch=128): the stream wraps into epoch 1 before any is tokenized, which
    # must not read as "no documents" (nanoGPT's one-file input.txt is this case).
    (tmp_path / "few.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(5)))
    ds = PackedDataset(tmp_path / "few.jsonl", tok, 16, 2, val_fraction=0.0)
    assert len(list(itertools.islice(ds, 4))) == 4
    (tmp_path / "input.txt").write_text("\n".join(_docs(50)))  # one .txt file: one document
    assert (
        len(list(itertools.islice(PackedDataset(tmp_path / "input.txt", tok, 16, 2, val_fraction=0.0), 4)))
        == 4
    )


def test_a_line_longer_than_a_document_is_cut(tmp_path: Path) -> None:
    # a text8-style file (one line, no newline) is held in memory max_doc_chars at a time, not whole
    text = " ".join(_docs(400)).replace("\n", " ") + " 猫が座った😀" * 300
    (tmp_path / "one_line.txt").write_text(text)
    chunks = list(iter_documents(tmp_path / "one_line.txt", max_doc_chars=1000))
    assert "".join(chunks) == text and max(len(c) for c in chunks) < 2000


@pytest.mark.parametrize("name", ["long.jsonl", "long.parquet"])
def test_a_record_longer_than_a_document_is_cut_and_resumes_inside_it(
    tmp_path: Path, tok: Tokenizer, name: str
) -> None:
    # one 50 MB JSONL text was tokenized in one piece (6 GB of encoding for one document); it is cut
    # at blanks as a .txt is, and a resume between its pieces goes on with the next piece
    long = " ".join(_docs(400)).replace("\n", " ")
    texts = ["short one", long, "short two"]
    if name.endswith(".jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    else:
        pa = pytest.importorskip("pyarrow")
        pytest.importorskip("pyarrow.parquet").write_table(pa.table({"text": texts}), tmp_path / name)
    docs = list(iter_documents(tmp_path / name, max_doc_chars=1000))
    assert docs[0] == "short one" and docs[-1] == "short two" and "".join(docs[1:-1]) == long
    assert len(docs) > 10 and max(len(d) for d in docs) <= 1000

    def make() -> PackedDataset:
        return PackedDataset(
            tmp_path / name, tok, 16, 2, val_fraction=0.0, tokenize_batch=1, max_doc_chars=1000
        )

    reference = list(itertools.islice(make(), 40))
    ds = make()
    it = iter(ds)
    for _ in range(20):
        next(it)
    state = ds.state_dict()
    assert state["cursor"][3] > 0  # inside the long record
    resumed = make()
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(reference[20:], itertools.islice(resumed, 20), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_whole_document_packing_cuts_a_long_document_without_reading_ahead(
    tmp_path: Path, tok: Tokenizer
) -> None:
    # A document longer than a window is cut as without whole-document packing: its windows do not
    # wait for (nor rescan) `lookahead` more documents; on long documents that made every window cost
    # the length of the next 32 documents.
    docs = [" ".join(_docs(200))] + _docs(100)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    kw = dict(val_fraction=0.0, shuffle=False, repeat=False, tokenize_batch=1)
    ds = PackedDataset(tmp_path / "c.jsonl", tok, 16, 2, whole_documents=True, **kw)
    first = next(iter(ds))
    assert ds._docs == 1  # only the long document has been read
    cut = next(iter(PackedDataset(tmp_path / "c.jsonl", tok, 16, 2, **kw)))
    assert torch.equal(first[0], cut[0]) and torch.equal(first[1], cut[1])


def test_bad_files_are_named(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl.*byte 15.*UTF-8"):
        list(iter_documents(tmp_path / "latin1.jsonl"))
    # a text file is read on (a crawl's stray byte), but a cp1252 file is said once, not trained on silently
    (tmp_path / "cp1252.txt").write_bytes(
        "ok\n<|endoftext|>\ncafé naïve\n<|endoftext|>\n".encode("cp1252") * 50
    )
    with pytest.warns(UserWarning, match=r"cp1252.txt: not UTF-8 at byte 20") as caught:
        docs = list(iter_documents(tmp_path / "cp1252.txt"))
    assert len(docs) == 100 and docs[1] == "caf\ufffd na\ufffdve\n" and len(caught) == 1
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match=r"ints.parquet.*'text' holds int64"):
        list(iter_documents(tmp_path / "ints.parquet"))


def test_a_directory_scan_skips_hidden_folders(tmp_path: Path) -> None:
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("A")  # a notebook's copy
    assert [p.name for p in resolve_files(tmp_path)] == ["a.txt"]


def test_a_file_whose_name_looks_like_a_glob_is_that_file(tmp_path: Path) -> None:
    """`--data "wiki [en].txt"` names that file; read as a glob it matched `wiki e.txt` instead."""
    (tmp_path / "wiki [en].txt").write_text("English")
    (tmp_path / "wiki e.txt").write_text("something else")
    assert resolve_files(tmp_path / "wiki [en].txt") == [tmp_path / "wiki [en].txt"]
    assert [p.name for p in resolve_files(str(tmp_path / "wiki [a-z].txt"))] == ["wiki e.txt"]  # a glob still


def test_an_unreadable_folder_or_file_is_an_error_not_a_gap_in_the_corpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import os

    (tmp_path / "open").mkdir()
    (tmp_path / "locked").mkdir()
    (tmp_path / "open" / "a.txt").write_text("A")
    (tmp_path / "locked" / "b.txt").write_text("B")
    real_scandir, real_open = os.scandir, builtins.open

    def denied(path: object) -> None:  # chmod 000 as the OS answers anyone but root
        raise PermissionError(13, "Permission denied", str(path))

    def scandir(path: object = ".") -> object:
        return denied(path) if str(path) == str(tmp_path / "locked") else real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    # rglob skipped the folder without a word: the corpus silently lacked b.txt
    with pytest.raises(ValueError, match=r"cannot read the folder .*locked: Permission denied"):
        resolve_files(tmp_path)
    monkeypatch.undo()

    def open_(file: object, *args: object, **kwargs: object) -> object:
        return (
            denied(file)
            if str(file) == str(tmp_path / "open" / "a.txt")
            else real_open(file, *args, **kwargs)
        )

    monkeypatch.setattr(builtins, "open", open_)
    # said up front, not as a PermissionError traceback once the reader reaches the file
    for source in (tmp_path, tmp_path / "open" / "a.txt"):
        with pytest.raises(ValueError, match=r"cannot read .*a.txt: Permission denied"):
            resolve_files(source)


def test_a_byte_order_mark_and_a_padded_separator_are_not_text(tmp_path: Path) -> None:
    # Notepad writes a BOM ("\ufeff" opened the first document); editors leave spaces after a separator
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufefffirst document\n<|endoftext|>  \nsecond document\n".encode())
    assert list(iter_documents(path)) == ["first document\n", "second document\n"]


def test_a_corrupt_gzip_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "cut.jsonl.gz"
    lines = "".join(
        json.dumps({"text": f"document {i} {random.Random(i).random()}"}) + "\n" for i in range(2000)
    )
    path.write_bytes(gzip.compress(lines.encode())[:2000])  # an interrupted download
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: not a readable gzip file"):
        list(iter_documents(path))


def test_a_parquet_file_damaged_past_its_footer_is_named(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(2000)]}), path, row_group_size=500)
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # a bad sector in a data page
    path.write_bytes(bytes(data))
    pq.ParquetFile(path)  # (its footer opens: the damage is met mid-read)
    # was pyarrow's "OSError: Corrupt snappy compressed data.", naming none of a corpus's shards
    with pytest.raises(ValueError, match=r"shard.parquet is not a readable parquet file .*damaged"):
        list(iter_documents(path))


def test_a_lone_surrogate_in_a_jsonl_text_names_its_line(tmp_path: Path) -> None:
    # valid JSON (an emoji cut in half), but no text: the run stopped on "'utf-8' codec can't encode
    # character '\ud83d'", naming no file, when the reader got there
    path = tmp_path / "crawl.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut \\ud83d emoji"}\n{"text": "pair \\ud83d\\ude00"}\n')
    with pytest.raises(ValueError, match=r"crawl.jsonl:2 \(byte 17\): .*lone surrogate U\+D83D"):
        list(iter_documents(path))
    path.write_text('{"text": "pair \\ud83d\\ude00"}\n')  # a whole pair is a character
    assert list(iter_documents(path)) == ["pair \U0001f600"]


def test_the_embedded_corpus_mixed_with_files_is_refused_as_such(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("my notes")
    # it was "data source not found: embedded", of a source the help lists
    with pytest.raises(ValueError, match="embedded corpus cannot be mixed with files"):
        next(iter_documents(["embedded:arithmetic", tmp_path / "notes.txt"]))


def test_two_embedded_sources_are_told_to_name_their_families_once() -> None:
    """`--data embedded:arithmetic --data embedded:countdown` (no file) was refused as "cannot be mixed
    with files"; the one source that names both families is said instead."""
    with pytest.raises(ValueError, match="give the embedded corpus once: .*embedded:TASK,TASK"):
        next(iter_documents(["embedded:arithmetic", "embedded:countdown"]))


def test_a_glob_reads_the_folders_it_matches(tmp_path: Path) -> None:
    """`--data 'shards/*'` reads shards/en/ and shards/fr/ as the shell's expansion of it does (the glob
    dropped the folders: their files were silently missing); their other files are left out, said."""
    for name in ("en/a.txt", "fr/b.jsonl", "top.txt", "empty/.keep", "fr/notes.csv"):
        (tmp_path / "shards" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "shards" / name).write_text('{"text": "x"}')
    with pytest.warns(UserWarning, match=r"1 file\(s\) of other types left out .*fr/notes.csv"):
        got = resolve_files(str(tmp_path / "shards" / "*"))
    assert [p.relative_to(tmp_path / "shards").as_posix() for p in got] == [
        "en/a.txt",
        "fr/b.jsonl",
        "top.txt",
    ]
    (tmp_path / "shards" / "fr" / "notes.csv").unlink()  # (`**` matches it itself: refused, as before)
    assert resolve_files(str(tmp_path / "shards" / "**")) == got  # each file once, in the same order
    with pytest.raises(FileNotFoundError, match="no files match"):
        resolve_files(str(tmp_path / "shards" / "emp*"))


def test_a_recursive_glob_keeps_the_order_of_the_files_it_matches(tmp_path: Path) -> None:
    """`d/**` matches d/ itself first: its files in a folder's order (d/a/b.txt before d/a.txt) changed
    the file list that a run's data position records, and a run started with the glob could not resume."""
    import glob

    for name in ("a.txt", "a-c.txt", "a/b.txt"):
        (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / name).write_text("x")
    pattern = str(tmp_path / "d" / "**")
    matched = [Path(m) for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
    assert [p.name for p in matched] == ["a-c.txt", "a.txt", "b.txt"]
    assert resolve_files(pattern) == matched


# ------------------------------------------------------------------ gaps found by mutation testing
def test_a_resume_inside_a_cut_record_reads_every_record_after_it(tmp_path: Path, tok: Tokenizer) -> None:
    """The piece cursor skips pieces of the record it points into only: the records after it, in its
    file and in the next one, are read whole (not short of the pieces skipped in the first)."""
    long = " ".join(_docs(60)).replace("\n", " ")
    rows = {"a.jsonl": ["short one", long, "short two", "short three"], "b.jsonl": ["short four", long]}
    for name, texts in rows.items():
        (tmp_path / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))

    def make() -> PackedDataset:
        return PackedDataset(
            tmp_path, tok, 16, 1, val_fraction=0.0, shuffle=False, repeat=False, tokenize_batch=1,
            max_doc_chars=1000,
        )  # fmt: skip

    reference = [x for x, _ in make()]
    ds = make()
    it = iter(ds)
    k = 0
    while not k or ds.state_dict()["cursor"][3] <= 1:  # to between two pieces of the first long record
        next(it)
        k += 1
    resumed = make()
    resumed.load_state_dict(ds.state_dict())
    rest = [x for x, _ in resumed]
    assert len(rest) == len(reference) - k and all(
        torch.equal(a, b) for a, b in zip(rest, reference[k:], strict=True)
    )


def test_a_long_record_is_cut_after_its_last_blank_in_the_second_half() -> None:
    from nanoseek.data.corpus import _cut_text

    # limit 8: "aaaa bbb" has its blank at 4, after the half (the piece ends with it); a blank at or
    # before the half would leave a short piece, so the cut falls at the limit, inside the word
    assert list(_cut_text("aaaa bbbbbb", 8)) == ["aaaa ", "bbbbbb"]
    assert list(_cut_text("aaa bbbbbbb", 8)) == ["aaa bbbb", "bbb"]
    assert list(_cut_text("a b\tc\nddddddd", 8)) == ["a b\tc\n", "ddddddd"]


def test_a_record_without_blanks_is_cut_at_the_limit(tmp_path: Path) -> None:
    from nanoseek.data.corpus import _cut_text

    text = "猫が座った" * 500  # 2500 characters and no blank to cut after
    assert list(itertools.islice(_cut_text(text, 1000), 5)) == [text[:1000], text[1000:2000], text[2000:]]
    (tmp_path / "cjk.jsonl").write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    assert list(iter_documents(tmp_path / "cjk.jsonl", max_doc_chars=1000)) == [
        text[:1000],
        text[1000:2000],
        text[2000:],
    ]


def test_mask_prompts_leaves_documents_that_are_no_chat_whole(tmp_path: Path, tok: Tokenizer) -> None:
    """Plain text keeps every target under mask_prompts, the start of each tokenize batch included (the
    BOS that opens a document, predicted from the end of the one before, mid-window)."""
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(30)))

    def targets(mask_prompts: bool) -> list[torch.Tensor]:
        ds = PackedDataset(
            tmp_path / "c.jsonl", tok, 16, 2, val_fraction=0.0, shuffle=False, repeat=False, tokenize_batch=1,
            mask_prompts=mask_prompts,
        )  # fmt: skip
        return [y for _, y in ds]

    plain, masked = targets(False), targets(True)
    assert len(plain) == len(masked) and all(torch.equal(a, b) for a, b in zip(plain, masked, strict=True))


def test_a_system_prompt_is_no_target_from_its_first_token(tmp_path: Path, tok: Tokenizer) -> None:
    from nanoseek.data.synthetic import ASSISTANT, EOS, USER

    doc = f"{tok.bos_token}cats sat{USER}q{ASSISTANT}a{EOS}"
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    ds = PackedDataset(
        tmp_path / "c.jsonl", tok, 64, 1, val_fraction=0.0, shuffle=False, repeat=False,
        whole_documents=True, mask_prompts=True,
    )  # fmt: skip
    x, y = next(iter(ds))
    trained = [t for t in y[0].tolist() if t >= 0]
    # the system text and the question predict nothing; <｜User｜>, <｜Assistant｜> (the tokens that end a
    # prompt) and the answer do
    assert trained == tok.encode(f"{USER}{ASSISTANT}a{EOS}")


def test_the_shuffle_buffer_mixes_windows(corpus: tuple[Path, list[str]], tok: Tokenizer) -> None:
    """Windows leave the shuffle buffer in random order: few follow the window they followed unshuffled
    (a draw counter that did not advance made the buffer a delay line: the stream in order)."""
    root, _ = corpus

    def windows(buffer: int, n: int) -> list[tuple[int, ...]]:
        ds = PackedDataset(
            root, tok, 16, 1, val_fraction=0.0, shuffle=True, shuffle_buffer=buffer, repeat=False
        )
        return [tuple(x[0].tolist()) for x, _ in itertools.islice(ds, n)]

    order = {w: i for i, w in enumerate(windows(0, 400))}
    shuffled = [order[w] for w in windows(16, 200)]
    in_order = sum(b == a + 1 for a, b in itertools.pairwise(shuffled))
    assert in_order < len(shuffled) // 4, in_order


def test_a_resume_mid_epoch_reads_the_next_epoch_whole(tmp_path: Path, tok: Tokenizer) -> None:
    """A position inside an epoch's second file resumes into later epochs that start at their first file."""
    docs = _docs(12, seed=3)
    for i in range(3):
        (tmp_path / f"{i}.jsonl").write_text(
            "".join(json.dumps({"text": d}) + "\n" for d in docs[4 * i : 4 * i + 4])
        )

    def make() -> PackedDataset:
        return PackedDataset(
            tmp_path, tok, 8, 1, val_fraction=0.0, shuffle_buffer=4, tokenize_batch=1, seed=5
        )

    reference = list(itertools.islice(make(), 150))
    ds = make()
    it = iter(ds)
    k = 0
    while not k or ds.state_dict()["cursor"][1] != 1:  # to a position inside the epoch's second file
        next(it)
        k += 1
    resumed = make()
    resumed.load_state_dict(ds.state_dict())
    for (x, y), (rx, ry) in zip(reference[k:], itertools.islice(resumed, 150 - k), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_window_tokens_leaves_out_only_the_trailing_padding() -> None:
    # the pad token inside a document (EOS, where it pads: the end of every assistant turn) is a
    # document's token that routing balances; only the run of it that ends the window is padding
    pad = 0
    x = torch.tensor([[5, pad, 7, pad, pad], [pad, 3, 4, 6, 8], [pad, pad, pad, pad, pad]])
    assert window_tokens(x, pad).tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],
        [False, False, False, False, False],
    ]


def test_whole_document_packing_fills_a_window_exactly(tmp_path: Path, tok: Tokenizer) -> None:
    """A document that fills the rest of a window exactly goes in it, and the windows do not depend on
    how many documents are tokenized at once."""
    docs = _docs(40, seed=1)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    sizes = [1 + len(tok.encode(d)) for d in docs]
    width = sizes[0] + sizes[1]

    def windows(tokenize_batch: int) -> list[list[int]]:
        ds = PackedDataset(
            tmp_path / "c.jsonl", tok, width - 1, 1, val_fraction=0.0, shuffle=False, repeat=False,
            whole_documents=True, lookahead=4, tokenize_batch=tokenize_batch,
        )  # fmt: skip
        return [x[0].tolist() + y[0, -1:].tolist() for x, y in ds]

    first = windows(128)
    assert first[0] == [tok.bos_token_id, *tok.encode(docs[0]), tok.bos_token_id, *tok.encode(docs[1])]
    assert windows(1) == first


# ------------------------------------------------------------------ reading, splitting, shuffling (mutation testing)
def test_sources_resolve_to_each_supported_file_once(tmp_path: Path) -> None:
    """A file named twice (itself and through its folder) is read once; hidden files are left out of a
    folder as hidden folders are; `**` globs reach any depth; an empty folder, a glob over a file of
    another type and a gzipped parquet (parquet compresses inside) are errors, not an empty corpus; files of
    other types in a folder are said to be left out, not skipped in silence."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "deep.txt").write_text("deep")
    (tmp_path / "top.txt").write_text("top")
    (tmp_path / ".hidden.txt").write_text("an editor's lock file")
    assert [p.name for p in resolve_files(tmp_path)] == ["deep.txt", "top.txt"]
    assert resolve_files([tmp_path, tmp_path / "top.txt", str(tmp_path / "*.txt")]) == resolve_files(tmp_path)
    assert [p.name for p in resolve_files(str(tmp_path / "**" / "*.txt"))] == ["deep.txt", "top.txt"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt/.md/.jsonl/.parquet files under"):
        resolve_files(tmp_path / "empty")
    (tmp_path / "empty" / "notes.csv").write_text("a,b")
    with pytest.raises(
        FileNotFoundError, match=r"no .txt/.md/.jsonl/.parquet files under .*\(only notes.csv\)"
    ):
        resolve_files(tmp_path / "empty")
    with pytest.warns(
        UserWarning, match=r"1 file\(s\) of other types left out of the data \(empty/notes.csv\)"
    ):
        assert [p.name for p in resolve_files(tmp_path)] == ["deep.txt", "top.txt"]
    with pytest.raises(ValueError, match=r"unsupported file type: .*notes.csv"):
        resolve_files(str(tmp_path / "empty" / "*"))
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    with pytest.raises(ValueError, match=r"unsupported file type: .*t.parquet.gz"):
        resolve_files(tmp_path / "t.parquet.gz")


def test_a_text_file_saved_on_windows_is_the_same_documents(tmp_path: Path) -> None:
    """CRLF line ends were kept: the same text saved on Windows became other documents (other tokens, a
    "\r" before every newline for the model to learn, another validation split). Python's text mode and
    HF datasets' text loader read them as "\n"; a line longer than a document is cut the same way too."""
    text = "one story\nits second line\n<|endoftext|>\nanother\n" + "word " * 60 + "\n"
    (tmp_path / "unix.txt").write_text(text)
    (tmp_path / "windows.txt").write_bytes(text.replace("\n", "\r\n").encode())
    for limit in (1_000_000, 64):
        unix = list(iter_documents(tmp_path / "unix.txt", max_doc_chars=limit))
        assert list(iter_documents(tmp_path / "windows.txt", max_doc_chars=limit)) == unix
    assert unix[0] == "one story\nits second line\n"


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    """A bad JSONL record is named by its line (as `sft --data` and `jsonl:` tasks name theirs), in a
    gzipped file and with Windows line endings too, not only by a byte offset an editor cannot go to."""
    good = '{"text": "a"}\r\n' * 3
    for name, bad, said in (
        ("field.jsonl", '{"body": "b"}', "no field 'text'"),
        ("json.jsonl", "{oops", "invalid JSON"),
        ("type.jsonl", '{"text": ["b"]}', "field 'text' is list"),
    ):
        (tmp_path / f"{name}.gz").write_bytes(gzip.compress((good + "\r\n" + bad + "\r\n").encode()))
        with pytest.raises(ValueError, match=rf"{name}.gz:5 \(byte 47\): {re.escape(said)}"):
            list(iter_documents(tmp_path / f"{name}.gz"))


def test_null_texts_are_skipped_and_other_values_refused(tmp_path: Path) -> None:
    """A null text (a dataset's missing value) is no document; a number is an error naming the field;
    a parquet column of large strings (polars writes those) is text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "n.jsonl").write_text('{"text": "a"}\n{"text": null}\n{"text": " \\n"}\n{"text": "b"}\n')
    assert list(iter_documents(tmp_path / "n.jsonl")) == ["a", "b"]  # (a blank text is no document either)
    (tmp_path / "i.jsonl").write_text('{"text": "a"}\n{"text": 5}\n')
    with pytest.raises(ValueError, match=r"i.jsonl:2 \(byte 14\): field 'text' is int, not text"):
        list(iter_documents(tmp_path / "i.jsonl"))
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "n.parquet")
    assert list(iter_documents(tmp_path / "n.parquet")) == ["a", "b"]
    pq.write_table(pa.table({"text": pa.array(["a", "b"], pa.large_string())}), tmp_path / "l.parquet")
    assert list(iter_documents(tmp_path / "l.parquet")) == ["a", "b"]


def test_parquet_string_view_and_dictionary_columns_are_text(tmp_path: Path) -> None:
    """Polars 1.38+ writes its strings as string_view (pola-rs/polars#26435), pandas a `category` column
    as a dictionary of strings: both are text, not "holds string_view, not text"."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    if hasattr(pa, "string_view"):
        view = pa.array(["a", None, "b"], pa.string_view())
        pq.write_table(pa.table({"text": view}), tmp_path / "v.parquet")
        assert list(iter_documents(tmp_path / "v.parquet")) == ["a", "b"]
    pq.write_table(pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()}), tmp_path / "d.parquet")
    assert list(iter_documents(tmp_path / "d.parquet")) == ["a", "b", "a"]
    ints = pa.array([1, 2]).dictionary_encode()  # a dictionary of numbers is still no text
    pq.write_table(pa.table({"text": ints}), tmp_path / "i.parquet")
    with pytest.raises(ValueError, match="'text' holds int64, not text"):
        list(iter_documents(tmp_path / "i.parquet"))


def test_a_stream_resumes_from_every_cursor_it_gives(tmp_path: Path) -> None:
    """Each document's cursor restarts the stream at the document after it, in every format: a .txt
    (a byte-order mark, separators, a line cut mid-way and its unread rest), a gzipped one, JSONL and
    parquet (null rows, several row groups). A line of CJK without blanks is cut between characters."""
    import warnings

    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanoseek.data.corpus import _Cursor, _DocumentStream

    docs = _docs(40, seed=5)
    one_line = " ".join(docs[:20]).replace("\n", " ") + "猫が座った" * 200
    (tmp_path / "a.txt").write_bytes(
        ("\ufeff" + "\n<|endoftext|>\n".join(docs[20:]) + "\n" + one_line).encode()
    )
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("\n<|endoftext|>\n".join(docs))
    rows = [None if i % 5 == 0 else d for i, d in enumerate(docs)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    pq.write_table(pa.table({"text": rows}), tmp_path / "d.parquet", row_group_size=7)
    for name in ("a.txt", "b.txt.gz", "c.jsonl", "d.parquet"):
        stream = _DocumentStream(tmp_path / name, "text", seed=0, max_doc_chars=300, shuffle_files=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (a cut between a character's bytes reads as U+FFFD, warned)
            read = list(stream.iter_from(_Cursor(), repeat=False))
        if name == "a.txt":
            assert "".join(d for d, _ in read) == "\n".join(docs[20:]) + "\n" + one_line
        for i, (_, cursor) in enumerate(read):
            assert list(stream.iter_from(cursor, repeat=False)) == read[i + 1 :], (name, i, cursor)
    embedded = _DocumentStream("embedded", "text", seed=0, max_doc_chars=300, shuffle_files=False)
    read = list(itertools.islice(embedded.iter_from(_Cursor(), repeat=True), 12))
    for i, (_, cursor) in enumerate(read[:6]):
        assert list(itertools.islice(embedded.iter_from(cursor, repeat=True), 6)) == read[i + 1 : i + 7]


def test_the_file_order_is_a_fair_shuffle_new_every_epoch_and_seed(tmp_path: Path) -> None:
    """Shuffled, the files come in every order over the epochs (Fisher-Yates: not only rotations, not
    one order for all epochs), and another seed gives other orders; unshuffled, in sorted order."""
    from nanoseek.data.corpus import _DocumentStream

    for name in "abc":
        (tmp_path / f"{name}.txt").write_text(name)

    def orders(seed: int, shuffle: bool = True) -> list[tuple[int, ...]]:
        stream = _DocumentStream(tmp_path, "text", seed=seed, max_doc_chars=100, shuffle_files=shuffle)
        return [tuple(stream.file_order(epoch)) for epoch in range(60)]

    assert len(set(orders(0))) == 6 and len(set(orders(0)[:6])) > 1
    assert orders(0) == orders(0) and orders(0) != orders(1)
    assert set(orders(0, shuffle=False)) == {(0, 1, 2)}


def test_a_shuffled_dataset_reads_its_files_in_each_epochs_order(tmp_path: Path, tok: Tokenizer) -> None:
    texts = _docs(3, seed=9)
    for name, text in zip("abc", texts, strict=True):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    ds = PackedDataset(tmp_path, tok, 15, 1, val_fraction=0.0, shuffle=True, shuffle_buffer=0, seed=2)
    ids = [t for x, y in itertools.islice(ds, 60) for t in x[0].tolist() + y[0, -1:].tolist()]
    read = tok.decode(ids).split(tok.bos_token)[1:-1]
    expected = [texts[i] for epoch in range(len(read)) for i in ds.stream.file_order(epoch)]
    assert len(read) > 12 and read == expected[: len(read)] and read[:12] != (texts * 4)


def test_the_validation_split_is_blake2b_of_the_text() -> None:
    """The documented split (a document is in validation when the little-endian 64-bit blake2b of its
    UTF-8 text is under val_fraction of 2**64): a run resumed with another nanoseek keeps its held-out set."""
    import hashlib

    for text in [*_docs(200, seed=4), "猫が座った", ""]:
        h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
        for fraction in (0.0, 0.1, 0.5):
            assert in_validation_split(text, fraction) == (h < fraction * 2**64)


@pytest.mark.parametrize(
    "changed",
    [{"seed": 1}, {"val_fraction": 0.2}, {"text_field": "body"}, {"shuffle_buffer": 4}, {"split": "val"}],
)
def test_a_data_position_resumes_only_with_the_settings_that_made_it(
    corpus: tuple[Path, list[str]], tok: Tokenizer, changed: dict
) -> None:
    root, _ = corpus
    kw = dict(seed=0, val_fraction=0.1, text_field="text", shuffle_buffer=8, split="train")
    ds = PackedDataset(root, tok, 16, 2, **kw)
    next(iter(ds))
    with pytest.raises(ValueError, match=f"settings changed.*{next(iter(changed))}"):
        PackedDataset(root, tok, 16, 2, **{**kw, **changed}).load_state_dict(ds.state_dict())
    with pytest.raises(ValueError, match="source"):
        PackedDataset(root / "c.parquet", tok, 16, 2, **kw).load_state_dict(ds.state_dict())


def test_the_validation_split_reads_once_in_order_by_default(
    corpus: tuple[Path, list[str]], tok: Tokenizer
) -> None:
    """split="val" neither shuffles nor repeats unless told: an evaluation pass ends, the same each time."""
    root, _ = corpus
    val = PackedDataset(root, tok, 16, 2, split="val", val_fraction=0.2)
    batches = list(itertools.islice(val, 1000))
    plain = list(PackedDataset(root, tok, 16, 2, split="val", val_fraction=0.2, shuffle=False, repeat=False))
    assert 0 < len(batches) == len(plain) < 1000
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, plain, strict=True))


def test_the_shuffle_buffer_drains_in_random_order(corpus: tuple[Path, list[str]], tok: Tokenizer) -> None:
    """At the end of a stream that does not repeat, the windows left in the buffer leave it in random
    order too: a pass shorter than the buffer is not read backwards; every window comes out once."""
    root, _ = corpus

    def windows(buffer: int) -> list[tuple[int, ...]]:
        ds = PackedDataset(
            root, tok, 16, 1, val_fraction=0.0, shuffle=True, shuffle_buffer=buffer, repeat=False
        )
        return [tuple(x[0].tolist()) for x, _ in ds]

    order = {w: i for i, w in enumerate(windows(0))}
    shuffled = [order[w] for w in windows(100_000)]  # every window is drawn at the end
    assert sorted(shuffled) == list(range(len(order)))
    assert sum(b in (a - 1, a + 1) for a, b in itertools.pairwise(shuffled)) < len(order) // 4


def test_a_resume_at_an_epochs_last_document_goes_on_into_the_next(tmp_path: Path, tok: Tokenizer) -> None:
    """A position saved right after an epoch's last document is no "empty split" on resume."""
    (tmp_path / "few.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(6)))
    end = (tmp_path / "few.jsonl").stat().st_size

    def make() -> PackedDataset:
        return PackedDataset(
            tmp_path / "few.jsonl", tok, 8, 1, val_fraction=0.0, shuffle_buffer=0, tokenize_batch=1
        )

    reference = list(itertools.islice(make(), 120))
    ds = make()
    it = iter(ds)
    k = 0
    while not k or ds.state_dict()["cursor"][:3] != [0, 0, end]:
        next(it)
        k += 1
    resumed = make()
    resumed.load_state_dict(ds.state_dict())
    for (x, _), (rx, _) in zip(reference[k:], itertools.islice(resumed, 120 - k), strict=True):
        assert torch.equal(x, rx)


def test_out_of_range_settings_are_refused(corpus: tuple[Path, list[str]], tok: Tokenizer) -> None:
    root, _ = corpus
    for kw, name in (
        ({"rank": -1, "world_size": 2}, "rank"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(ValueError, match=name):
            PackedDataset(root, tok, 16, **{"batch_size": 2, **kw})
    state = PackedDataset(root, tok, 16, 2).state_dict()
    with pytest.raises(ValueError, match="unknown data-position format"):
        PackedDataset(root, tok, 16, 2).load_state_dict({**state, "version": 2})


def test_a_data_position_saved_with_another_tokenizer_is_refused(
    corpus: tuple[Path, list[str]], tok: Tokenizer
) -> None:
    """Its unpacked tokens and shuffle buffer are the other tokenizer's ids."""
    root, _ = corpus
    ds = PackedDataset(root, tok, 16, 2)
    next(iter(ds))
    other = train_tokenizer(_docs(100, seed=1), vocab_size=300)
    assert other.vocab_size != tok.vocab_size
    with pytest.raises(ValueError, match=f"vocab_size: {tok.vocab_size} -> {other.vocab_size}"):
        PackedDataset(root, other, 16, 2).load_state_dict(ds.state_dict())


def test_a_dataset_folders_card_is_not_read_as_a_document(tmp_path) -> None:
    """`pretrain --data` on a Hugging Face dataset's folder read its README.md (the card: a YAML header,
    tables) and LICENSE as corpus documents beside the records; a folder of notes keeps its README."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-0.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    (tmp_path / "LICENSE.txt").write_text("MIT\n")
    (tmp_path / "notes.md").write_text("# a note\n")
    with pytest.warns(UserWarning, match=r"LICENSE.txt, README.md left out of the data: a data set's card"):
        assert [p.name for p in resolve_files(tmp_path)] == ["train-0.jsonl", "notes.md"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("# read me\n")
    (notes / "b.txt").write_text("b\n")
    assert [p.name for p in resolve_files(notes)] == ["README.md", "b.txt"]
    assert resolve_files(tmp_path / "README.md") == [tmp_path / "README.md"]  # named outright: read


def test_resolve_files_for_a_reader_of_one_kind(tmp_path) -> None:
    """Chat and problem data are JSONL only: a folder's other files (a dataset card) are left out of
    them with a warning, a glob or a file of another kind is refused, saying what is read."""
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.jsonl.gz").write_bytes(b"")
    (tmp_path / "README.md").write_text("# card\n")
    with pytest.warns(UserWarning, match=r"1 file\(s\) of other types left out of the data \(README.md\)"):
        assert [p.name for p in resolve_files(tmp_path, kinds=("jsonl",))] == ["a.jsonl", "b.jsonl.gz"]
    with pytest.raises(ValueError, match=r"README.md \(use .jsonl or .jsonl.gz\)"):
        resolve_files(str(tmp_path / "*"), kinds=("jsonl",))
    # a file named outright is read as the reader's kind (chats.txt), parquet's binary only refused
    assert resolve_files(tmp_path / "README.md", kinds=("jsonl",)) == [tmp_path / "README.md"]
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"t.parquet \(use .jsonl or .jsonl.gz\)"):
        resolve_files(tmp_path / "t.parquet", kinds=("jsonl",))
    (tmp_path / "cards").mkdir()
    (tmp_path / "cards" / "card.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no .jsonl files under .* \(only card.txt\)"):
        resolve_files(tmp_path / "cards", kinds=("jsonl",))


def test_a_pipe_given_to_the_corpus_is_named_as_one(tmp_path: Path) -> None:
    """`pretrain --data <(zcat corpus.txt.gz)`: the corpus reads its files more than once and resumes at a
    byte offset, so it cannot take a pipe; it said "data source not found" for one that exists."""
    import os

    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"corpus.txt is a pipe or device, not a file: .*save it to a file"):
        resolve_files(str(fifo))


def test_file_kinds_are_read_from_names_in_any_case(tmp_path) -> None:
    """`A.JSONL`, `B.JSONL.GZ` (a Windows tool's names) are JSON lines, the second gzipped: a folder of
    them was left out of the data as files of other types, or read as bytes that are not UTF-8."""
    from nanoseek.data.tasks.adapters import JsonlTask

    (tmp_path / "A.JSONL").write_text(json.dumps({"prompt": "1+1?", "answer": 2}) + "\n")
    with gzip.open(tmp_path / "B.JSONL.GZ", "wt") as f:
        f.write(json.dumps({"prompt": "2+2?", "answer": 4}) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no file left out
        assert [p.name for p in resolve_files(tmp_path, kinds=("jsonl",))] == ["A.JSONL", "B.JSONL.GZ"]
        task = JsonlTask(f"jsonl:{tmp_path}", str(tmp_path))
    assert sorted(p.answer for p in task.items) == ["2", "4"]


# ------------------------------------------------------------------ properties (hypothesis)
_TXT_CHARS = st.sampled_from(list("ab z\t猫😀é") + ["<|endoftext|>"])
# a text file's lines: words of a few alphabets (one and several UTF-8 bytes), blanks, and separator lines
_TXT_LINES = st.lists(
    st.one_of(
        st.lists(_TXT_CHARS, max_size=12).map("".join),
        st.sampled_from(["<|endoftext|>", "<|endoftext|>  ", "", "   "]),
    ),
    max_size=12,
)


def _txt_documents(path: Path, max_doc_chars: int = 1_000_000) -> list[str]:
    """Every document of a text file as read, blank ones too (which iter_documents leaves out)."""
    from nanoseek.data.corpus import _Cursor, _DocumentStream

    stream = _DocumentStream(path, "text", seed=0, max_doc_chars=max_doc_chars, shuffle_files=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no byte of these files is read as U+FFFD)
        return [d for d, _ in stream.iter_from(_Cursor(), repeat=False) if d]  # (not the file's end)


def _separated(text: str) -> list[str]:
    """The documents of a text file by the rule: a line that is a separator ends one."""
    docs, doc = [], ""
    for line in re.split(r"(?<=\n)", text):
        if line.strip() == "<|endoftext|>":
            docs, doc = [*docs, doc], ""
        else:
            doc += line
    return [d for d in [*docs, doc] if d]


@settings(max_examples=80)
@given(lines=_TXT_LINES, end=st.sampled_from(["", "\n"]), limit=st.integers(1, 40))
def test_a_text_file_reads_the_same_with_crlf_a_bom_and_gzip(lines: list[str], end: str, limit: int) -> None:
    """CRLF line ends, a byte-order mark and gzip change the bytes of a text file, not its documents, at
    any max_doc_chars; the documents are the text between separator lines, cut (at any limit that holds
    a separator line) into pieces that put each back together."""
    import tempfile

    text = "\n".join(lines) + end
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp, "plain.txt")
        plain.write_bytes(text.encode())
        Path(tmp, "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode())
        Path(tmp, "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
        Path(tmp, "all.txt.gz").write_bytes(
            gzip.compress(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
        )
        docs = _txt_documents(plain)
        assert docs == _separated(text)
        cut = _txt_documents(plain, max_doc_chars=limit)
        if limit >= len("<|endoftext|>  \r\n"):  # pieces of the same documents, which end where theirs do
            assert "".join(cut) == "".join(docs)
            assert set(itertools.accumulate(map(len, docs))) <= set(itertools.accumulate(map(len, cut)))
        for name in ("crlf.txt", "bom.txt", "all.txt.gz"):
            assert _txt_documents(Path(tmp, name)) == docs, name
            assert _txt_documents(Path(tmp, name), max_doc_chars=limit) == cut, name


@settings(max_examples=60)
@given(
    lines=_TXT_LINES,
    crlf=st.booleans(),
    bom=st.booleans(),
    kind=st.sampled_from(["txt", "jsonl", "parquet"]),
    limit=st.integers(1, 40),
)
def test_a_file_resumes_from_every_cursor_at_any_limit(
    lines: list[str], crlf: bool, bom: bool, kind: str, limit: int
) -> None:
    """Each document's cursor restarts a text, JSONL or parquet file's stream at the document after it,
    wherever the limit cut the file (inside a line, between a CRLF's two bytes, before a separator's
    text) or a record (between its pieces)."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanoseek.data.corpus import _Cursor, _DocumentStream

    text = "\n".join(json.dumps({"text": line}) for line in lines) if kind == "jsonl" else "\n".join(lines)
    data = (text.replace("\n", "\r\n") if crlf else text).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, f"a.{kind}")
        if kind == "parquet":
            pq.write_table(pa.table({"text": [line or None for line in lines]}), path, row_group_size=3)
        else:
            path.write_bytes(b"\xef\xbb\xbf" + data if bom else data)
        stream = _DocumentStream(path, "text", seed=0, max_doc_chars=limit, shuffle_files=False)
        read = list(stream.iter_from(_Cursor(), repeat=False))
        for i, (_, cursor) in enumerate(read):
            assert list(stream.iter_from(cursor, repeat=False)) == read[i + 1 :], (i, cursor)


_RECORD_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
# a JSONL file's lines: records (other fields beside the text, escaped or not, blanks around them), null
# texts, and blank lines
_JSONL_LINES = st.lists(
    st.one_of(
        st.tuples(_RECORD_TEXT, st.booleans(), st.sampled_from(["", " ", "\t "])).map(
            lambda r: (r[0], json.dumps({"id": 1, "text": r[0]}, ensure_ascii=r[1]) + r[2])
        ),
        st.sampled_from([(None, '{"text": null}'), (None, ""), (None, "  "), (None, "\t")]),
    ),
    max_size=8,
)


def _jsonl_bytes(lines: list[str], crlf: bool, bom: bool) -> bytes:
    data = "".join(line + ("\r\n" if crlf else "\n") for line in lines).encode()
    return b"\xef\xbb\xbf" + data if bom else data


@settings(max_examples=80)
@given(
    records=_JSONL_LINES,
    crlf=st.booleans(),
    bom=st.booleans(),
    gz=st.booleans(),
    bad=st.none()
    | st.tuples(st.integers(0, 8), st.sampled_from(["{oops", '{"body": "b"}', "[1]", '{"text": 5}'])),
)
def test_a_jsonl_file_reads_its_texts_and_names_the_line_of_a_bad_record(
    records: list[tuple[str | None, str]], crlf: bool, bom: bool, gz: bool, bad: tuple[int, str] | None
) -> None:
    """Any mix of records, null texts and blank lines, with CRLF line ends, a byte-order mark, gzipped or
    not, reads as its texts (a blank text is no document); a malformed line is an error naming the file
    and its line, and the byte where that line starts."""
    import tempfile

    lines = [line for _, line in records]
    if bad is not None:
        at = min(bad[0], len(lines))
        lines.insert(at, bad[1])
    data = _jsonl_bytes(lines, crlf, bom)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "data.jsonl.gz" if gz else "data.jsonl")
        path.write_bytes(gzip.compress(data) if gz else data)
        if bad is None:
            assert list(iter_documents(path)) == [t for t, _ in records if t is not None and t.strip()]
            return
        start = len(_jsonl_bytes(lines[:at], crlf, bom)) if at else 3 * bom  # (after the mark)
        with pytest.raises(ValueError, match=rf"{re.escape(path.name)}:{at + 1} \(byte {start}\): "):
            list(iter_documents(path))


class _LetterTokenizer:
    """A token per letter (a: 3 ... z: 28), "^" the BOS a document may open with (id 1), a newline 2,
    pad 0: a packed window reads back as the documents' letters."""

    bos_token_id, pad_token_id, vocab_size = 1, 0, 29

    def token_to_id(self, token: str) -> None:
        return None  # no chat tokens: nothing for mask_prompts to find

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[{"^": 1, "\n": 2}.get(c) or ord(c) - 94 for c in t] for t in texts]


_LETTERS = _LetterTokenizer()
# documents of 1-20 letters, a few opening with their own BOS (as a chat rendered by a template does)
_PACKED_DOCS = st.lists(
    st.tuples(st.booleans(), st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=20)).map(
        lambda d: ("^" if d[0] else "") + d[1]
    ),
    min_size=1,
    max_size=25,
)


def _packed(
    docs: list[str], seq_len: int, batch_size: int, **kw: Any
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of a PackedDataset over `docs` (a JSONL file; unshuffled, one pass, every document
    trained unless told otherwise), tokenized one letter a token."""
    import tempfile

    kw = {"val_fraction": 0.0, "shuffle": False, "repeat": False, **kw}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "docs.jsonl")
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        return list(PackedDataset(path, _LETTERS, seq_len, batch_size, **kw))


def _rows(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[int]]:
    """Each window of seq_len+1 tokens again: inputs, then the last target (-1 where padding)."""
    rows = []
    for x, y in batches:
        w = torch.cat([x, y[:, -1:]], dim=1)
        w[:, 1:] = torch.where(y == -100, -1, w[:, 1:])  # (only padding has no target here)
        rows += w.tolist()
    return rows


def _stream(docs: list[str]) -> list[int]:
    """The corpus as one token stream: each document behind a BOS, unless it opens with its own."""
    return [t for d in docs for t in ([] if d.startswith("^") else [1]) + _LETTERS.encode_batch([d])[0]]


@settings(max_examples=60)
@given(
    docs=_PACKED_DOCS,
    seq_len=st.integers(1, 12),
    batch_size=st.integers(1, 3),
    tokenize_batch=st.integers(1, 6),
)
def test_packing_tiles_the_token_stream(
    docs: list[str], seq_len: int, batch_size: int, tokenize_batch: int
) -> None:
    """Windows of seq_len+1 tokens cut the BOS-separated stream of documents in order, each token once;
    the targets are the inputs shifted by one, and only the tail that fills no whole batch is dropped."""
    batches = _packed(docs, seq_len, batch_size, tokenize_batch=tokenize_batch)
    stream, flat = _stream(docs), [t for row in _rows(batches) for t in row]
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) < batch_size * (seq_len + 1)
    for x, y in batches:
        assert x.shape == y.shape == (batch_size, seq_len) and torch.equal(x[:, 1:], y[:, :-1])


@settings(max_examples=60)
@given(
    docs=_PACKED_DOCS,
    seq_len=st.integers(1, 12),
    lookahead=st.integers(1, 4),
    tokenize_batch=st.integers(1, 6),
)
def test_whole_document_packing_keeps_every_document_whole_or_cut_in_order(
    docs: list[str], seq_len: int, lookahead: int, tokenize_batch: int
) -> None:
    """With whole_documents, a window holds whole documents (BOS first) after the rest of the one cut
    before it, padded with nothing to predict; every document is in one window, but one longer than a
    window, which is cut into full windows and its rest; nothing is dropped or repeated, each document
    is placed no further than `lookahead` places ahead of its turn, and the windows are the same however
    many documents are tokenized at once."""
    width = seq_len + 1
    kw = {"whole_documents": True, "lookahead": lookahead}
    batches = _packed(docs, seq_len, 1, tokenize_batch=tokenize_batch, **kw)
    assert _rows(batches) == _rows(_packed(docs, seq_len, 1, **kw))  # (tokenize_batch 128)
    for x, _ in batches:
        n = int((x != _LETTERS.pad_token_id).sum())
        assert (x[0, n:] == _LETTERS.pad_token_id).all()  # padding only at the end
    encoded = [([] if d.startswith("^") else [1]) + _LETTERS.encode_batch([d])[0] for d in docs]
    placed: dict[int, list[int]] = {}  # each document's tokens, put back together from the windows
    unplaced = list(range(len(docs)))  # in the corpus's order
    cut = None  # the document whose rest opens the next window
    for row in _rows(batches):
        real = row[: row.index(-1)] if -1 in row else row
        starts = [i for i, t in enumerate(real) if t == 1]
        assert (starts[:1] == [0]) == (cut is None)  # a window opens with a document or a cut one's rest
        if cut is not None:
            placed[cut] += real[: (starts or [len(real)])[0]]
            cut = None if placed[cut] == encoded[cut] else cut
        # the head is the first document not placed yet; the others come from the `lookahead` after it
        allowed = unplaced[: lookahead + (starts[:1] == [0])]
        for j, (a, b) in enumerate(itertools.pairwise([*starts, len(real)])):
            piece = real[a:b]
            if j == 0 and a == 0:  # only the head is cut, where it is longer than a window
                k = unplaced[0]
                assert piece == encoded[k] or (len(piece) == width and encoded[k][:width] == piece)
            else:
                k = next(k for k in allowed if encoded[k] == piece)  # (of equal documents, the first)
            placed[k], cut = piece, (k if piece != encoded[k] else cut)
            unplaced.remove(k)
            allowed.remove(k)
    assert cut is None and unplaced == [] and placed == dict(enumerate(encoded))


@settings(max_examples=40)
@given(
    docs=_PACKED_DOCS,
    files=st.integers(1, 3),
    seq_len=st.integers(1, 10),
    batch_size=st.integers(1, 3),
    whole=st.booleans(),
    shuffle_buffer=st.integers(0, 5),
    val_fraction=st.sampled_from([0.0, 0.3]),
    skip=st.integers(0, 8),
)
def test_a_data_position_resumes_exactly_anywhere(
    docs: list[str],
    files: int,
    seq_len: int,
    batch_size: int,
    whole: bool,
    shuffle_buffer: int,
    val_fraction: float,
    skip: int,
) -> None:
    """A dataset loaded from the state of one that gave `skip` batches gives the batches the first gives
    next, wherever that is: inside a document, a file (JSONL, text, gzipped), a shuffle buffer, an epoch
    or several, each reading the files in its own order."""
    import tempfile

    kw = {"seed": 3, "shuffle_buffer": shuffle_buffer, "val_fraction": val_fraction, "tokenize_batch": 2}
    if whole:
        kw.update(whole_documents=True, lookahead=2)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp, name) for name in ("a.jsonl", "b.txt", "c.jsonl.gz")[:files]]
        for k, path in enumerate(paths):
            part = docs[k::files]
            if path.suffix == ".txt":
                path.write_text("\n<|endoftext|>\n".join(part))
            else:
                data = "".join(json.dumps({"text": d}) + "\n" for d in part).encode()
                path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)

        def make() -> PackedDataset:
            return PackedDataset(paths, _LETTERS, seq_len, batch_size, **kw)

        if all(in_validation_split(d, val_fraction) for d in iter_documents(paths)):
            with pytest.raises(ValueError, match="no documents in the train split"):
                next(iter(make()))
            return
        reference = list(itertools.islice(make(), skip + 4))
        ds = make()
        list(itertools.islice(ds, skip))
        resumed = make()
        resumed.load_state_dict(ds.state_dict())
        assert _rows(list(itertools.islice(resumed, 4))) == _rows(reference[skip:])


@settings(max_examples=40)
@given(
    docs=st.lists(
        st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=20), min_size=1, max_size=25, unique=True
    ),
    val_fraction=st.sampled_from([0.2, 0.5, 0.8]),
)
def test_each_document_is_in_exactly_the_split_its_hash_says(docs: list[str], val_fraction: float) -> None:
    """Training and validation read every document once between them, each on the side its text's hash
    puts it: a held-out document is never trained on."""
    sides = {}
    for split in ("train", "val"):
        want = [d for d in docs if in_validation_split(d, val_fraction) == (split == "val")]
        if not want:
            with pytest.raises(ValueError, match=f"no documents in the {split} split"):
                _packed(docs, 21, 1, split=split, val_fraction=val_fraction, whole_documents=True)
            continue
        rows = _rows(_packed(docs, 21, 1, split=split, val_fraction=val_fraction, whole_documents=True))
        got = [t for row in rows for t in row if t != -1]
        sides[split] = sorted("".join(chr(t + 94) for t in d) for d in _split_at_bos(got))
        assert sides[split] == sorted(want)


def _split_at_bos(tokens: list[int]) -> list[list[int]]:
    starts = [i for i, t in enumerate(tokens) if t == 1]
    return [tokens[a + 1 : b] for a, b in itertools.pairwise([*starts, len(tokens)])]


@settings(max_examples=40)
@given(
    docs=_PACKED_DOCS,
    seq_len=st.integers(1, 8),
    batch_size=st.integers(1, 3),
    world_size=st.integers(1, 3),
    whole=st.booleans(),
    shuffle_buffer=st.integers(0, 6),
)
def test_ranks_and_the_shuffle_buffer_deal_out_the_same_windows(
    docs: list[str], seq_len: int, batch_size: int, world_size: int, whole: bool, shuffle_buffer: int
) -> None:
    """N ranks' batches, side by side, are the batches of one process with an N times larger batch; and
    the shuffle buffer reorders the windows of one pass, dropping none and repeating none (but the tail
    that fills no whole batch)."""
    kw = {
        "whole_documents": whole,
        "lookahead": 2,
        "seed": 5,
        "shuffle": True,
        "shuffle_buffer": shuffle_buffer,
    }
    one = _packed(docs, seq_len, batch_size * world_size, **kw)
    ranks = [
        _packed(docs, seq_len, batch_size, rank=r, world_size=world_size, **kw) for r in range(world_size)
    ]
    assert all(len(r) == len(one) for r in ranks)
    for i, (x, y) in enumerate(one):
        assert torch.equal(x, torch.cat([r[i][0] for r in ranks])) and torch.equal(
            y, torch.cat([r[i][1] for r in ranks])
        )
    plain = _rows(_packed(docs, seq_len, 1, **{**kw, "shuffle": False}))
    shuffled = _rows(_packed(docs, seq_len, 1, **kw))
    assert sorted(shuffled) == sorted(plain)


@settings(max_examples=60)
@given(
    text=st.text(st.sampled_from("ab \t\n猫"), max_size=60), limit=st.integers(1, 12), parquet=st.booleans()
)
def test_a_long_record_is_cut_into_pieces_that_hold_its_text(text: str, limit: int, parquet: bool) -> None:
    """A JSONL or parquet text longer than max_doc_chars is read as pieces of at most that many
    characters that put it back together, in order."""
    import tempfile

    from nanoseek.data.corpus import _Cursor, _DocumentStream

    with tempfile.TemporaryDirectory() as tmp:
        if parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            path = Path(tmp, "t.parquet")
            pq.write_table(pa.table({"text": ["x", text, "y"]}), path)
        else:
            path = Path(tmp, "t.jsonl")
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("x", text, "y")))
        stream = _DocumentStream(path, "text", seed=0, max_doc_chars=limit, shuffle_files=False)
        pieces = [d for d, c in stream.iter_from(_Cursor(), repeat=False)][:-1]  # (the file's end: "")
    assert pieces[0] == "x" and pieces[-1] == "y" and "".join(pieces[1:-1]) == text
    assert all(len(p) <= limit for p in pieces)


@settings(max_examples=60)
@given(
    text=st.text(st.sampled_from("ab \n猫😀"), max_size=40),
    bad=st.sampled_from([b"\xff", b"\xe9", b"\xe7\x8c", b"\xf0\x9f\x98"]),
    at=st.integers(0, 200),
    limit=st.integers(1, 30),
)
def test_bytes_that_are_not_utf8_in_a_text_file_are_read_as_u_fffd_and_named_once(
    text: str, bad: bytes, at: int, limit: int
) -> None:
    """A text file with bytes that are not UTF-8 (Latin-1, a character cut short) reads as Python decodes
    it with errors="replace", at any max_doc_chars, with one warning that names the first bad byte."""
    import tempfile

    data = text.encode()
    while at > 0 and at < len(data) and data[at] & 0xC0 == 0x80:
        at -= 1  # (between characters: a bad byte inside one is another bad sequence)
    at = min(at, len(data))
    data = data[:at] + bad + data[at:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "latin.txt")
        path.write_bytes(data)
        from nanoseek.data.corpus import _Cursor, _DocumentStream

        stream = _DocumentStream(path, "text", seed=0, max_doc_chars=limit, shuffle_files=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            docs = [d for d, _ in stream.iter_from(_Cursor(), repeat=False)]
    assert "".join(docs) == data.decode("utf-8", errors="replace")
    assert [str(w.message).split(":")[1] for w in caught] == [f" not UTF-8 at byte {at}"]


# ------------------------------------------------------------------ what the properties found
def test_a_crlf_that_a_documents_limit_splits_is_still_one_line_end(tmp_path: Path) -> None:
    """A line whose "\\r" filled the read limit kept it: "😀\\r\\n" at max_doc_chars 5 (4 + 1 bytes) was
    the document "😀\\r\\n", not the "😀\\n" of the same text saved with Unix line ends."""
    (tmp_path / "w.txt").write_bytes("😀\r\nab\r\n".encode())
    (tmp_path / "u.txt").write_bytes("😀\nab\n".encode())
    assert list(iter_documents(tmp_path / "w.txt", max_doc_chars=5)) == ["😀\nab\n"]
    assert list(iter_documents(tmp_path / "u.txt", max_doc_chars=5)) == ["😀\nab\n"]


def test_separator_text_inside_a_long_line_is_text(tmp_path: Path) -> None:
    """A separator is a line that is exactly <|endoftext|>: the rest of a long line cut just before it
    was taken for one, the text dropped and the document ended there."""
    (tmp_path / "a.txt").write_text("abcdefgh <|endoftext|>\nmore\n")
    assert "".join(iter_documents(tmp_path / "a.txt", max_doc_chars=16)) == "abcdefgh <|endoftext|>\nmore\n"


def test_a_limit_below_a_characters_bytes_does_not_cut_it(tmp_path: Path) -> None:
    """max_doc_chars 1 read one byte of "猫" (3 bytes) at a time: U+FFFD three times, and a warning that
    the file is not UTF-8."""
    (tmp_path / "a.txt").write_text("猫😀")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "".join(iter_documents(tmp_path / "a.txt", max_doc_chars=1)) == "猫😀"


def test_a_byte_order_mark_before_no_record_is_not_invalid_json(tmp_path: Path) -> None:
    """A JSONL file that opens with a byte-order mark and a blank line (or holds nothing but the mark) was
    "invalid JSON" at line 1: json.loads skips the mark only in front of a record."""
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf\r\n{"text": "a"}\r\n')
    assert list(iter_documents(tmp_path / "a.jsonl")) == ["a"]
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf")
    assert list(iter_documents(tmp_path / "b.jsonl")) == []


@pytest.mark.parametrize("limit", [0, -1])
def test_a_document_limit_below_one_is_refused_not_an_endless_loop(tmp_path: Path, limit: int) -> None:
    """max_doc_chars 0 cut a JSONL text into empty pieces forever."""
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match=f"max_doc_chars must be positive, got {limit}"):
        list(iter_documents(tmp_path / "a.jsonl", max_doc_chars=limit))


def _chat_segment() -> st.SearchStrategy[str]:
    from nanoseek.tokenizer import (
        ASSISTANT,
        EOS,
        THINK_END,
        THINK_START,
        TOOL_OUTPUT_BEGIN,
        TOOL_OUTPUT_END,
        USER,
    )

    words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(" ".join)
    return st.one_of(
        words.map(lambda w: f"{USER}{w}"),
        words.map(lambda w: f"{ASSISTANT}{w}{EOS}"),
        st.tuples(words, words).map(lambda w: f"{ASSISTANT}{THINK_START}\n{w[0]}\n{THINK_END}\n{w[1]}{EOS}"),
        words.map(lambda w: f"{TOOL_OUTPUT_BEGIN}{w}{TOOL_OUTPUT_END}"),
        words,
    )


@settings(max_examples=30)
@given(
    chats=st.lists(st.lists(_chat_segment(), min_size=1, max_size=6).map("".join), min_size=1, max_size=6),
    seq_len=st.integers(2, 24),
    tokenize_batch=st.integers(1, 3),
)
def test_the_prompt_mask_of_a_window_is_its_documents_whatever_the_cuts(
    tok: Tokenizer, chats: list[str], seq_len: int, tokenize_batch: int
) -> None:
    """mask_prompts: each window's targets (a token, or none in a prompt, a tool's result, an earlier
    answer of a reasoning chat) are those of the same positions in one window over the whole corpus,
    however the windows and the tokenize batches cut the chats."""
    import tempfile

    kw = {"val_fraction": 0.0, "shuffle": False, "repeat": False, "mask_prompts": True}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "chats.jsonl")
        path.write_text("".join(json.dumps({"text": c}) + "\n" for c in chats))
        n = sum(1 + len(ids) for ids in tok.encode_batch(chats))
        whole = next(iter(PackedDataset(path, tok, n - 1, 1, **kw)))[1][0].tolist()
        cut = list(PackedDataset(path, tok, seq_len, 1, tokenize_batch=tokenize_batch, **kw))
    for k, (_, y) in enumerate(cut):
        at = k * (seq_len + 1)  # (a window's first token is no target: it is the one before its first)
        assert y[0].tolist() == whole[at : at + seq_len], k


def test_a_parquet_shard_whose_every_text_is_null_is_no_documents(tmp_path: Path) -> None:
    """pyarrow and pandas type a column of None as null: such a shard stopped the corpus with "column
    'text' holds null, not text", where the same missing texts in a string column are no documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [None, None]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": ["b"]}), tmp_path / "b.parquet")
    assert pa.types.is_null(pq.read_schema(tmp_path / "a.parquet").field("text").type)
    assert list(iter_documents(tmp_path)) == ["b"]
