"""Text corpora, streamed, and the packed pretraining dataset built on them.

What is notable:
- Sources: `.txt`/`.md`, `.jsonl` (one JSON object per line, text in `text_field`), `.parquet` (read by
  record batches, never whole), any of them gzipped (`.txt.gz`, `.jsonl.gz`), globs, directories
  (recursive, sorted; beside `.jsonl`/`.parquet` records a folder's README/LICENSE is the data set's card,
  left out with a warning) and lists of these; "embedded" (or None) is the built-in synthetic corpus, and
  "embedded:arithmetic,comparison" the same corpus restricted to those task families.
- A `.txt` file is one document, unless it holds separator lines: a line that is exactly
  `<|endoftext|>` or `<｜end▁of▁sentence｜>` ends a document (the TinyStories convention). A document
  longer than `max_doc_chars` is cut at a line boundary, so memory stays bounded on huge files; so is
  a longer JSONL or parquet text, at a blank (one 50 MB record is not tokenized in one piece).
  Bytes that are not UTF-8 are read as U+FFFD, with a warning naming the file (in JSONL, an error);
  a text file's Windows line ends (CRLF) are read as "\n", as Python's text mode reads them.
- `PackedDataset`: documents are tokenized in batches, each prefixed with BOS (unless it opens with one,
  as a chat rendered by a chat template does), concatenated and cut into windows of seq_len+1 tokens
  (no token dropped or repeated except the tail at the very end), shuffled through a seeded buffer,
  and batched as (inputs, targets = inputs shifted by one).
- Validation split by document hash (blake2b of the text): a document is in exactly one split whatever
  the file order, shuffling or duplicates, so train and validation never overlap. A document cut into
  `max_doc_chars` pieces is split piece by piece, as nanoGPT splits one long text file: a corpus of one
  book still has a validation split, whose pieces hold text the training pieces do not. The embedded corpus
  splits by problem instead: validation reads its held-out stream (`synthetic`, split "test").
- An exact data position: `state_dict()` holds the cursor into the sources (file, byte offset or row),
  the tokens not yet packed and the shuffle buffer, so `load_state_dict` continues with exactly the batch
  an uninterrupted run would have produced next, without re-reading or re-tokenizing what came before.
- Data parallel: every rank walks the same window stream and takes its own slice of each global batch,
  so N ranks see exactly the batches one process with an N-times larger batch would see.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nanoseek.data.files import file_kind, open_binary, resolve_files, skip_byte_order_mark
from nanoseek.tokenizer import ASSISTANT, EOS, THINK_START, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END, USER

if TYPE_CHECKING:
    import torch

    from nanoseek.tokenizer import Tokenizer

DOC_SEPARATORS = frozenset({"<|endoftext|>", EOS})
EMBEDDED = "embedded"
# Text tokenized at once at most (and a document more): long documents fill it before `tokenize_batch` does.
TOKENIZE_CHARS = 4_000_000


def is_embedded(source: Any) -> bool:
    return source is None or (
        isinstance(source, str) and (source == EMBEDDED or source.startswith(EMBEDDED + ":"))
    )


def embedded_tasks(source: Any) -> list[str] | None:
    """The task families of an "embedded:arithmetic,comparison" source (None: every built-in family)."""
    if not isinstance(source, str) or ":" not in source:
        return None
    from nanoseek.data.tasks import split_task_list

    return split_task_list(source.partition(":")[2])


# ------------------------------------------------------------------ readers
# Each reader yields (document, offset just after it); restarting at that offset resumes the file.
def _read_txt(path: Path, offset: int, max_doc_chars: int) -> Iterator[tuple[str, int]]:
    with open_binary(path) as f:
        f.seek(max(0, offset - 1))
        # what is read next continues a line cut before (a resume inside one too): it is no separator
        midline = offset > 0 and f.read(1) != b"\n"
        lines: list[str] = []
        size = 0
        carry = b""  # the rest of a line longer than a document, read but not yet used
        warned = False
        if offset == 0:
            skip_byte_order_mark(f)
        while True:
            # (at least a character's 4 bytes: a cut never falls inside the only character read)
            limit = max(1, max(4, max_doc_chars) - len(carry))
            raw = carry + f.readline(limit)
            carry = b""
            if not raw:
                break
            if raw.endswith(b"\r") and f.peek(1)[:1] == b"\n":
                # a CRLF the limit split: read as one line end (below), not a "\r" left in the text
                raw += f.read(1)
            starts_line = not midline
            if not raw.endswith(b"\n") and len(raw) >= max_doc_chars:
                # a line longer than a document (a text8-style file is one line): cut it at its last
                # blank, else at a character boundary, so one line never holds the whole file in memory
                cut = max(raw.rfind(b" "), raw.rfind(b"\t")) + 1
                if cut <= len(raw) // 2:  # no blank late in it: cut before its last character's start
                    k = len(raw) - 1
                    while k > 0 and raw[k] & 0xC0 == 0x80:  # UTF-8 continuation bytes
                        k -= 1
                    cut = k if k > 0 and raw[k] >= 0xC0 else len(raw)
                raw, carry = raw[:cut], raw[cut:]
            midline = not raw.endswith(b"\n")
            whole = starts_line and not carry and (not midline or not f.peek(1))  # (or the file's last)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # (a JSONL line is refused; a text file is read on, once said)
                line = raw.decode("utf-8", errors="replace")
                if not warned:
                    warned = True
                    at = f.tell() - len(carry) - len(raw) + e.start
                    warnings.warn(
                        f"{path}: not UTF-8 at byte {at}: bytes that are not UTF-8 are read as U+FFFD "
                        "(convert the file first, e.g. iconv -f cp1252 -t utf-8)",
                        stacklevel=2,
                    )
            if line.endswith("\r\n"):
                # Windows line ends read as Python's text mode (and HF datasets' text loader) reads them:
                # the same text saved on Windows is the same documents, with no "\r" tokens to learn
                line = line[:-2] + "\n"
            # a separator is a whole line: the rest of a long line cut before "<|endoftext|>" is text
            if whole and line.strip() in DOC_SEPARATORS:
                if lines:
                    yield "".join(lines), f.tell() - len(carry)
                lines, size = [], 0
                continue
            lines.append(line)
            size += len(line)
            if size >= max_doc_chars:  # bounded memory: cut a huge document at a line boundary
                yield "".join(lines), f.tell() - len(carry)
                lines, size = [], 0
        if lines:
            yield "".join(lines), f.tell() - len(carry)


def _line_at(path: Path, at: int) -> str:
    """`path:LINE (byte at)` for the line that starts at byte `at`, for errors: an editor goes to a line,
    not a byte (the reader keeps byte offsets, which resume a file without reading it from its start)."""
    with open_binary(path) as f:
        line, left = 1, at
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            line += chunk.count(b"\n")
            left -= len(chunk)
    return f"{path}:{line} (byte {at})"


def _read_jsonl(path: Path, offset: int, text_field: str) -> Iterator[tuple[str, int]]:
    with open_binary(path) as f:
        f.seek(offset)
        if offset == 0:  # (before a blank first line, or alone in a file, it was "invalid JSON")
            skip_byte_order_mark(f)
        while True:
            at = f.tell()
            raw = f.readline()
            if not raw:
                break
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as e:  # (a ValueError, but not a JSONDecodeError)
                raise ValueError(f"{_line_at(path, at)}: the line is not UTF-8: {e}") from e
            except json.JSONDecodeError as e:
                raise ValueError(f"{_line_at(path, at)}: invalid JSON: {e}") from e
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{_line_at(path, at)}: no field {text_field!r} (has {keys})")
            text = obj[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(
                    f"{_line_at(path, at)}: field {text_field!r} is {type(text).__name__}, not text"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                # valid JSON (a web crawl's emoji cut in half), but no text the split's hash or the
                # tokenizer can encode: it stopped the run naming no file, wherever the reader reached it
                raise ValueError(
                    f"{_line_at(path, at)}: field {text_field!r} holds a lone surrogate "
                    f"U+{ord(text[e.start]):04X} (a \\uD800-\\uDFFF escape without its pair): fix or drop the line"
                ) from None
            yield text, f.tell()


def _read_parquet(path: Path, offset: int, text_field: str) -> Iterator[tuple[str, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowException as e:  # pyarrow's error names no file ("Parquet magic bytes not found")
        raise ValueError(
            f"{path} is not a readable parquet file ({e}): it is truncated or damaged, or not parquet"
        ) from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")

    def is_text(t: pa.DataType) -> bool:
        # string_view: what polars 1.38+ writes for its strings (pyarrow >= 16 reads it); dictionary: a
        # pandas `category` column; null: a shard whose every text is missing (pyarrow and pandas type a
        # column of None so), no document as a null text of a string column or a JSONL line is none
        if pa.types.is_dictionary(t):
            return is_text(t.value_type)
        view = getattr(pa.types, "is_string_view", lambda _: False)(t)
        return pa.types.is_string(t) or pa.types.is_large_string(t) or view or pa.types.is_null(t)

    kind = pf.schema_arrow.field(text_field).type
    if not is_text(kind):
        raise ValueError(f"{path}: column {text_field!r} holds {kind}, not text")
    # Offsets are row numbers; start at the row group that holds `offset` and skip inside it.
    first, row = 0, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > offset:
            break
        row += n
        first = g + 1
    if first >= pf.metadata.num_row_groups:
        return
    groups = list(range(first, pf.metadata.num_row_groups))
    batches = pf.iter_batches(batch_size=1024, row_groups=groups, columns=[text_field])
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            # a damaged page past the footer ("Corrupt snappy compressed data"): pyarrow names no file,
            # and a corpus of many shards stopped there without saying which
            raise ValueError(f"{path} is not a readable parquet file ({e}): it is damaged") from None
        if batch is None:
            break
        for text in batch.column(0).to_pylist():
            row += 1
            if row <= offset or text is None:
                continue
            yield text, row


def _cut_text(text: str, limit: int) -> Iterator[str]:
    """`text` in pieces of at most `limit` characters, each cut after its last blank where that is in
    its second half (as `_read_txt` cuts a line longer than a document)."""
    start = 0
    while len(text) - start > limit:
        end = start + limit
        blank = max(text.rfind(c, start, end) for c in " \t\n") + 1
        if blank > start + limit // 2:
            end = blank
        yield text[start:end]
        start = end
    yield text[start:]


def _read_embedded(
    offset: int, seed: int, split: str, tasks: list[str] | None = None, multi_turn: float = 0.0
) -> Iterator[tuple[str, int]]:
    from nanoseek.data.synthetic import iter_documents as synthetic_documents

    docs = synthetic_documents(seed=seed, split=split, tasks=tasks, multi_turn=multi_turn)
    for i, doc in enumerate(itertools.islice(docs, offset, None), start=offset + 1):
        yield doc, i


def iter_documents(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None = EMBEDDED,
    text_field: str = "text",
    *,
    seed: int = 0,
    max_doc_chars: int = 1_000_000,
) -> Iterator[str]:
    """Stream the documents of `source` in order; "embedded"/None is the endless synthetic corpus."""
    stream = _DocumentStream(source, text_field, seed=seed, max_doc_chars=max_doc_chars, shuffle_files=False)
    for doc, _ in stream.iter_from(_Cursor(), repeat=False):
        if doc.strip():
            yield doc


def tokenizer_documents(
    source: str | os.PathLike | Sequence[str | os.PathLike] | None = EMBEDDED,
    text_field: str = "text",
    *,
    seed: int = 0,
) -> Iterator[str]:
    """The documents a tokenizer learns its merges from: those of `source`, except that the embedded
    corpus leaves out the strings its problems spell letter by letter (a counting problem's text).
    Merged, each random chunk of letters would be one more spelling for the model to memorize."""
    if not is_embedded(source):
        yield from iter_documents(source, text_field, seed=seed)
        return
    from nanoseek.data.synthetic import iter_documents as synthetic_documents

    for doc in synthetic_documents(
        seed=seed, split="train", tasks=embedded_tasks(source), blank_spelled=True
    ):
        if doc.strip():
            yield doc


# ------------------------------------------------------------------ positions
@dataclass(frozen=True)
class _Cursor:
    """Where the next document comes from: epoch, index into that epoch's file order, offset in the file,
    and the pieces already read of the record there (a JSONL/parquet text longer than max_doc_chars)."""

    epoch: int = 0
    file: int = 0
    offset: int = 0
    piece: int = 0


_MASK64 = (1 << 64) - 1


def _mix(seed: int, counter: int) -> int:
    """splitmix64 of (seed, counter): a stateless, portable random stream (the state is the counter)."""
    z = (seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class _DocumentStream:
    def __init__(
        self,
        source: Any,
        text_field: str,
        *,
        seed: int,
        max_doc_chars: int,
        shuffle_files: bool,
        embedded_split: str = "train",
        multi_turn: float = 0.0,
    ) -> None:
        if max_doc_chars < 1:  # (a JSONL text was cut into empty pieces forever)
            raise ValueError(f"max_doc_chars must be positive, got {max_doc_chars}")
        self.embedded = is_embedded(source)
        self.multi_turn = multi_turn
        self.embedded_tasks = embedded_tasks(source) if self.embedded else None
        self.embedded_split = embedded_split
        if not self.embedded and not isinstance(source, str | os.PathLike) and any(map(is_embedded, source)):
            # (`--data embedded --data notes.txt`: it was "data source not found: embedded")
            if all(map(is_embedded, source)):  # no file among them: one source names several families
                raise ValueError(
                    "give the embedded corpus once: --data embedded, or embedded:TASK,TASK for some families"
                )
            raise ValueError(
                "the embedded corpus cannot be mixed with files: give --data embedded alone, or only files"
            )
        self.files = [] if self.embedded else resolve_files(source)
        self.text_field = text_field
        self.seed = seed
        self.max_doc_chars = max_doc_chars
        self.shuffle_files = shuffle_files

    def file_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        if self.shuffle_files:  # Fisher-Yates with the portable generator, new order every epoch
            for i in range(len(order) - 1, 0, -1):
                j = _mix(self.seed ^ 0x5EED, epoch * 1_000_003 + i) % (i + 1)
                order[i], order[j] = order[j], order[i]
        return order

    def _read(self, path: Path, offset: int, skip: int) -> Iterator[tuple[str, int, int]]:
        """(document, offset, piece): restarting at (offset, piece) resumes the file. A record's text
        longer than max_doc_chars is cut into pieces (the first `skip` left out): all but its last
        resume at the record, from the next piece (a .txt reader cuts its own documents)."""
        kind = file_kind(path)
        if kind == "txt":
            docs = _read_txt(path, offset, self.max_doc_chars)
        elif kind == "jsonl":
            docs = _read_jsonl(path, offset, self.text_field)
        else:
            docs = _read_parquet(path, offset, self.text_field)
        try:
            start = offset  # where the record being read can be read again
            for doc, after in docs:
                if kind == "txt":
                    yield doc, after, 0
                    continue
                pieces = list(_cut_text(doc, self.max_doc_chars))
                for i in range(skip, len(pieces)):
                    yield (pieces[i], after, 0) if i == len(pieces) - 1 else (pieces[i], start, i + 1)
                start, skip = after, 0
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a truncated or corrupt download
            raise ValueError(f"{path}: not a readable gzip file ({e})") from e

    def iter_from(self, cursor: _Cursor, repeat: bool) -> Iterator[tuple[str, _Cursor]]:
        """Documents from `cursor` on, each with the cursor just after it; `repeat` runs epochs forever."""
        if self.embedded:
            for doc, offset in _read_embedded(
                cursor.offset, self.seed, self.embedded_split, self.embedded_tasks, self.multi_turn
            ):
                yield doc, _Cursor(0, 0, offset)
            return
        epoch, index, offset, skip = astuple(cursor)
        while True:
            order = self.file_order(epoch)
            for k in range(index, len(order)):
                for doc, after, piece in self._read(self.files[order[k]], offset, skip):
                    yield doc, _Cursor(epoch, k, after, piece)
                offset = skip = 0
                # Mark the file as finished so a resume does not reopen it.
                yield "", _Cursor(epoch, k + 1, 0)
            if not repeat:
                return
            epoch, index, offset = epoch + 1, 0, 0


# ------------------------------------------------------------------ packing
def in_validation_split(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a property of its text alone."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return h < val_fraction * 2.0**64


def in_chat_prompt(
    inputs: torch.Tensor,
    user_id: int,
    assistant_id: int,
    bos_id: int,
    output_begin_id: int | None = None,
    output_end_id: int | None = None,
) -> torch.Tensor:
    """[B, S] bool: position i is inside a chat's prompt, so the token after it is prompt text: a user
    turn (from <｜User｜> up to the token before <｜Assistant｜>, or the end of its document: a chat cut
    after a question), a tool's result (from <｜tool▁output▁begin｜> up to the token before
    <｜tool▁output▁end｜>) or the system prompt (from BOS up to the token before the chat's first turn).
    The token that ends a prompt stays a target, and so do the model's tool calls. A prompt's numbers
    are random and a tool's result is the tool's: nothing can predict them, and their loss only adds
    noise to the gradient of the response that can be learned (SFT trains on neither)."""
    import torch

    n = inputs.shape[1]
    idx = torch.arange(n, device=inputs.device).expand_as(inputs)
    ids = [t for t in (user_id, assistant_id, bos_id, output_begin_id, output_end_id) if t is not None]
    marks = torch.isin(inputs, torch.tensor(ids, device=inputs.device))  # where a span starts
    span = torch.where(marks, idx, -1).cummax(dim=1).values  # the mark that opens the span i is in
    opener = inputs.gather(1, span.clamp(min=0)).masked_fill(span < 0, -1)
    ahead = torch.where(marks, idx, n).flip(1).cummin(dim=1).values.flip(1)
    next_mark = torch.nn.functional.pad(ahead[:, 1:], (0, 1), value=n)  # the first mark after i
    follows = inputs.gather(1, next_mark.clamp(max=n - 1)).masked_fill(next_mark == n, -1)
    # a document's text before its chat's first turn is that chat's system prompt
    prompt = (opener == user_id) | ((opener == bos_id) & (follows >= 0) & (follows != bos_id))
    if output_begin_id is not None:
        prompt |= opener == output_begin_id
    return prompt & (next_mark != idx + 1)


def window_tokens(inputs: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[B, S] bool: False on the padding that ends a whole-documents window (the trailing run of the pad
    token), True on the documents' tokens, which the routers' balancing counts. (Where the pad token is
    EOS, a document's closing EOS right before the padding goes uncounted with it.)"""
    return (inputs != pad_id).int().flip(1).cummax(dim=1).values.flip(1).bool()


def in_history_answer(
    inputs: torch.Tensor, user_id: int, assistant_id: int, think_id: int, bos_id: int
) -> torch.Tensor:
    """[B, S] bool: position i is inside an earlier answer of a reasoning chat (from its <｜Assistant｜>
    to its end of sentence): an assistant turn that does not open with <think>, followed in the same
    document by one that does. R1's template drops the reasoning of a chat's earlier answers, so nothing
    the document shows computes them: like a prompt's numbers, they are guesses whose loss is noise. A
    chat without reasoning keeps the loss of every answer."""
    import torch

    n = inputs.shape[1]
    idx = torch.arange(n, device=inputs.device).expand_as(inputs)
    nxt = torch.nn.functional.pad(inputs[:, 1:], (0, 1), value=-1)
    opens = inputs == assistant_id
    thinks = opens & (nxt == think_id)
    turn = torch.where(opens, idx, -1).cummax(dim=1).values  # the assistant turn i is in, if any
    after = torch.where((inputs == bos_id) | (inputs == user_id), idx, -1).cummax(dim=1).values
    inside = turn > after
    answer_only = inside & ~thinks.gather(1, turn.clamp(min=0))

    def next_at(mask: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, idx, n).flip(1).cummin(dim=1).values.flip(1)

    return answer_only & (next_at(thinks) < next_at(inputs == bos_id))


class PackedDataset:
    """Batches of packed token windows: iterate for `(inputs [B,S], targets [B,S])` long tensors.

    The dataset holds its data position: iterating continues from it, `state_dict()` saves it and
    `load_state_dict()` restores it (then iterate again). `reset()` goes back to the start.
    """

    # set by each iteration (`_windows`) for `_refill`: the epoch it reads, that epoch's documents of this
    # split so far, whether any document read had text
    _epoch: int
    _epoch_docs: int
    _any_text: bool

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike] | None,
        tokenizer: Tokenizer | str | os.PathLike,
        seq_len: int,
        batch_size: int,
        *,
        split: str = "train",
        val_fraction: float = 0.01,
        seed: int = 0,
        shuffle: bool | None = None,
        shuffle_buffer: int = 512,
        repeat: bool | None = None,
        text_field: str = "text",
        rank: int = 0,
        world_size: int = 1,
        tokenize_batch: int = 128,
        max_doc_chars: int = 1_000_000,
        whole_documents: bool = False,
        lookahead: int = 32,
        mask_prompts: bool = False,
        multi_turn: float = 0.0,
    ) -> None:
        """`multi_turn`: the share of the embedded corpus's chats that ask several questions in a row
        (`nanoseek.data.synthetic.iter_documents`); other sources ignore it."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive (got {seq_len}, {batch_size})")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if split == "val" and val_fraction == 0 and not is_embedded(source):
            raise ValueError("split='val' needs val_fraction > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if isinstance(tokenizer, str | os.PathLike):
            from nanoseek.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.source = source
        self.seq_len, self.batch_size = seq_len, batch_size
        self.split, self.val_fraction, self.seed = split, val_fraction, seed
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.shuffle_buffer = shuffle_buffer if self.shuffle else 0
        self.repeat = (split == "train") if repeat is None else repeat
        self.rank, self.world_size = rank, world_size
        self.tokenize_batch = tokenize_batch
        self.whole_documents, self.lookahead = whole_documents, max(1, lookahead)
        user, assistant = tokenizer.token_to_id(USER), tokenizer.token_to_id(ASSISTANT)
        # a tokenizer without DeepSeek's chat tokens cannot have encoded a user turn: nothing to mask
        self.mask_prompts = mask_prompts and user is not None and assistant is not None
        outputs = (tokenizer.token_to_id(TOOL_OUTPUT_BEGIN), tokenizer.token_to_id(TOOL_OUTPUT_END))
        self._chat_ids = (user, assistant, tokenizer.bos_token_id, *outputs)
        self._think_id = tokenizer.token_to_id(THINK_START)  # None: no reasoning chat, no answer to mask
        # The embedded corpus has its own held-out split (problems never trained on): validation reads
        # that stream directly instead of filtering 1 document in 100 out of the training stream.
        self.stream = _DocumentStream(
            source,
            text_field,
            seed=seed,
            max_doc_chars=max_doc_chars,
            shuffle_files=self.shuffle,
            embedded_split="test" if split == "val" else "train",
            multi_turn=multi_turn,
        )
        self._hash_split = not self.stream.embedded
        self._fingerprint = {
            "source": (source or EMBEDDED) if self.stream.embedded else [str(f) for f in self.stream.files],
            "text_field": text_field,
            "seq_len": seq_len,
            "split": split,
            "val_fraction": val_fraction,
            "seed": seed,
            "shuffle_buffer": self.shuffle_buffer,
            "bos_token_id": tokenizer.bos_token_id,
            "vocab_size": tokenizer.vocab_size,
        }
        if whole_documents:  # (absent from older states: they were all cut contiguously)
            self._fingerprint.update(whole_documents=True, lookahead=self.lookahead)
        if multi_turn and self.stream.embedded:  # (absent from older states: one question a chat)
            self._fingerprint.update(multi_turn=multi_turn)
        self.reset()

    def reset(self) -> None:
        self._cursor = _Cursor()
        self._pending: list[int] = []  # tokenized; pending[_start:] is not yet in a window
        self._start = 0
        self._buffer: list[list[int]] = []  # shuffle buffer of windows
        self._draws = 0  # random draws made from the shuffle buffer
        self._batches = 0
        self._docs = 0  # documents of this split consumed
        self._exhausted = False

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        import torch

        width = self.seq_len + 1
        buffer = torch.tensor(self._buffer, dtype=torch.int32) if self._buffer else torch.zeros(0, width)
        return {
            "version": 1,
            "fingerprint": dict(self._fingerprint),
            "cursor": list(astuple(self._cursor)),
            "pending": torch.tensor(self._pending[self._start :], dtype=torch.int32),
            "buffer": buffer.to(torch.int32),
            "draws": self._draws,
            "batches": self._batches,
            "documents": self._docs,
            "exhausted": self._exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError(f"unknown data-position format (version {state.get('version')!r})")
        saved = state["fingerprint"]
        # a setting recorded only when it is not its default is compared in both directions
        keys = [*self._fingerprint, *(k for k in saved if k not in self._fingerprint)]
        changed = [k for k in keys if saved.get(k) != self._fingerprint.get(k)]
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {self._fingerprint.get(k)!r}" for k in changed)
            if "whole_documents" in changed and not saved.get("whole_documents"):
                detail += (
                    "; it was saved cutting documents at window edges (as every run did before whole-document"
                    " packing): resume with --cut-documents"
                )
            raise ValueError(f"cannot resume the data position, the data settings changed ({detail})")
        self._cursor = _Cursor(*(int(x) for x in state["cursor"]))
        self._pending, self._start = state["pending"].tolist(), 0
        self._buffer = state["buffer"].tolist()
        self._draws = int(state["draws"])
        self._batches = int(state["batches"])
        self._docs = int(state["documents"])
        self._exhausted = bool(state["exhausted"])

    # ---------------------------------------------------------------- iteration
    def _segments(self, limit: int) -> list[tuple[int, int]]:
        """(start, end) in _pending of the next `limit` pieces: the head (maybe a document's rest,
        without BOS), then whole BOS-opened documents."""
        bos, i = self.tokenizer.bos_token_id, self._start
        out: list[tuple[int, int]] = []
        n = len(self._pending)
        while i < n and len(out) < limit:
            try:  # (list.index: a C loop; the documents of a corpus may be long)
                j = self._pending.index(bos, i + 1)
            except ValueError:
                j = n
            out.append((i, j))
            i = j
        return out

    def _take_whole(self, width: int) -> list[int] | None:
        """A window of whole documents: the head piece, then the first-fitting of the next `lookahead`
        documents, padded with -1 (no target). A piece longer than the window is cut contiguously, as
        without whole-document packing. None while _pending needs more documents first."""
        a = self._start
        if (
            len(self._pending) - a >= width
            and self.tokenizer.bos_token_id not in self._pending[a + 1 : a + width]
        ):
            # the head is longer than a window: cut it (the window is the same whatever follows the
            # head, so there is no need to look for, tokenize and scan `lookahead` documents first)
            self._start += width
            return self._pending[a : a + width]
        pieces = self._segments(self.lookahead + 1)
        if not pieces or (len(pieces) <= self.lookahead and not self._exhausted):
            return None
        a, b = pieces[0]
        if b - a >= width:
            self._start += width
            return self._pending[a : a + width]
        window, taken = self._pending[a:b], [(a, b)]
        for a2, b2 in pieces[1:]:
            if len(window) + (b2 - a2) <= width:
                window += self._pending[a2:b2]
                taken.append((a2, b2))
        rest, prev = [], self._start  # _pending without the taken pieces
        for a2, b2 in taken:
            rest += self._pending[prev:a2]
            prev = b2
        self._pending[self._start :] = rest + self._pending[prev:]
        return window + [-1] * (width - len(window))

    def _refill(self, docs: Iterator[tuple[str, _Cursor]]) -> None:
        """Tokenize the next batch of this split's documents onto _pending (BOS before each)."""
        del self._pending[: self._start]  # compact only when refilling: O(1) per window
        self._start = 0
        batch: list[str] = []
        chars = 0
        want_val = self.split == "val"
        for doc, cursor in docs:
            self._cursor = cursor
            if cursor.epoch != self._epoch:
                # (the documents in `batch` count: a corpus smaller than one tokenize batch wraps
                # around into the next epoch before any of it is tokenized)
                if self._epoch_docs == 0 and self._docs == 0:
                    raise self._empty_split()
                self._epoch, self._epoch_docs = cursor.epoch, 0
            self._any_text = self._any_text or bool(doc.strip())
            if doc.strip() and (
                not self._hash_split or in_validation_split(doc, self.val_fraction) == want_val
            ):
                batch.append(doc)
                chars += len(doc)
                self._epoch_docs += 1
                if len(batch) >= self.tokenize_batch or chars >= TOKENIZE_CHARS:
                    break
            elif batch and not doc and not self.stream.embedded and cursor.file >= len(self.stream.files):
                break  # an epoch's end: a small corpus is not tokenized many times over in one batch
        else:
            self._exhausted = True
        if batch:
            bos = self.tokenizer.bos_token_id
            tokens: list[int] = []
            for ids in self.tokenizer.encode_batch(batch):
                if ids[:1] != [bos]:  # (a chat rendered by apply_chat_template opens with its own)
                    tokens.append(bos)
                tokens.extend(ids)
            self._pending.extend(self._flag_untrained(tokens) if self.mask_prompts else tokens)
            self._docs += len(batch)

    def _flag_untrained(self, tokens: list[int]) -> list[int]:
        """Whole documents' tokens, each that is no target (a chat's prompt or a tool's result, an
        earlier answer of a reasoning chat) stored as -2 - id. Found here, over whole documents, not in
        each window: the part of a chat cut into the next window keeps its mask there (it has no
        <｜User｜> to find)."""
        import torch

        x = torch.tensor([tokens])
        user, assistant, bos, *outputs = self._chat_ids
        assert user is not None and assistant is not None  # (mask_prompts: the tokenizer has both)
        untrained = in_chat_prompt(x, user, assistant, bos, *outputs)
        if self._think_id is not None:
            untrained |= in_history_answer(x, user, assistant, self._think_id, bos)
        # position i masks the token it predicts, i + 1
        flag = torch.nn.functional.pad(untrained[0, :-1], (1, 0), value=False)
        return torch.where(flag, -2 - x[0], x[0]).tolist()

    def _windows(self) -> Iterator[list[int]]:
        """Packed windows of seq_len+1 tokens; the instance state is always exactly 'after this window'.

        Contiguous cuts by default (a document may end in the next window, without its start);
        `whole_documents` packs whole documents and pads the rest of a window instead."""
        width = self.seq_len + 1
        docs = self.stream.iter_from(self._cursor, repeat=self.repeat)
        self._epoch_docs, self._epoch = 0, self._cursor.epoch
        self._any_text = False  # a document of either split read: an empty split is not an empty corpus
        while True:
            if self.whole_documents:
                window = self._take_whole(width)
                while window is None and not self._exhausted:
                    self._refill(docs)
                    window = self._take_whole(width)
            else:
                while len(self._pending) - self._start < width and not self._exhausted:
                    self._refill(docs)
                window = None
                if len(self._pending) - self._start >= width:
                    window = self._pending[self._start : self._start + width]
                    self._start += width
            if window is None:
                if self._docs == 0:
                    raise self._empty_split()
                return  # the end of a non-repeating stream; the last partial window is dropped
            yield window

    def _empty_split(self) -> ValueError:
        msg = f"no documents in the {self.split} split of {self.source!r}"
        if self._hash_split and not self._any_text:  # not the split's doing: it has no text at all
            return ValueError(f"no documents in {self.source!r}: every text in it is empty or null")
        if self._hash_split:
            # the split hashes whole documents: a corpus of one or a few (a single .txt of a book)
            # puts them all on one side
            msg += (
                f" (each document goes to validation with probability --val-fraction {self.val_fraction:g}; "
                "a corpus of few documents can put every one on one side: cut the text into more "
                "documents with a line <|endoftext|> between them"
                + (", or pass --val-fraction 0)" if self.split == "train" else ")")
            )
        return ValueError(msg)

    def _shuffled(self) -> Iterator[list[int]]:
        for window in self._windows():
            if len(self._buffer) < self.shuffle_buffer:
                self._buffer.append(window)
                continue
            if not self.shuffle_buffer:
                yield window
                continue
            j = _mix(self.seed, self._draws) % len(self._buffer)
            self._draws += 1
            out, self._buffer[j] = self._buffer[j], window
            yield out
        while self._buffer:  # stream ended: drain the buffer in random order
            j = _mix(self.seed, self._draws) % len(self._buffer)
            self._draws += 1
            self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
            yield self._buffer.pop()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        import torch

        per_step = self.batch_size * self.world_size
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        windows = self._shuffled()
        while True:
            rows = list(itertools.islice(windows, per_step))
            if len(rows) < per_step:
                return  # never a ragged batch: every rank stops at the same step
            x = torch.tensor(rows[lo:hi], dtype=torch.long)
            self._batches += 1
            untrained = x < -1  # (`_flag_untrained`)
            x = torch.where(untrained, -2 - x, x)
            inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
            if self.whole_documents:  # padding (-1): the pad token in, nothing to predict
                inputs = inputs.masked_fill(inputs < 0, self.tokenizer.pad_token_id)
                targets = targets.masked_fill(targets < 0, -100)
            yield inputs, targets.masked_fill(untrained[:, 1:], -100)
