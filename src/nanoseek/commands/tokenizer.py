"""`nanoseek tokenizer train|encode|decode`: byte-level BPE with DeepSeek's special tokens."""

from __future__ import annotations

import argparse
import sys

EMBEDDED_DEFAULT_DOCS = 20_000
# The text the summary's compression is measured on: the first documents, up to 200 and this many
# characters (a corpus of 1M-character documents held and encoded 200 whole: 5-9 GB)
SAMPLE_CHARS = 1_000_000


def register(subparsers: argparse._SubParsersAction) -> None:
    from nanoseek.options import Extend, path

    p = subparsers.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer, or encode / decode with one",
        description="Byte-level BPE (HF tokenizers) with DeepSeek's special tokens and the R1 chat template.",
    )
    sub = p.add_subparsers(dest="action", metavar="<action>", required=True)

    t = sub.add_parser("train", help="train on a corpus and save tokenizer.json + tokenizer_config.json")
    t.add_argument(
        "--data",
        nargs="+",
        action=Extend,  # `--data a.txt --data b.txt`: both
        type=path,
        default=["embedded"],
        help="'embedded' (default), 'embedded:TASKS', or .txt/.jsonl/.parquet files, globs or directories",
    )
    t.add_argument("--vocab-size", type=int, default=4096, help="total ids, special tokens included")
    t.add_argument("--out", required=True, type=path, help="directory to write")
    t.add_argument(
        "--max-docs",
        type=int,
        default=None,
        help=f"documents to train on (default: {EMBEDDED_DEFAULT_DOCS:,} for the embedded corpus, all otherwise)",
    )
    t.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are never merged")
    t.add_argument("--text-field", default="text", help="JSON key / parquet column holding the text")
    t.add_argument("--seed", type=int, default=0, help="seed of the embedded corpus")
    t.set_defaults(func=run_train)

    e = sub.add_parser("encode", help="print the token ids of a text")
    e.add_argument("tokenizer", type=path, help="tokenizer directory or tokenizer.json")
    e.add_argument("text", nargs="?", help="text to encode (default: read stdin)")
    e.add_argument("--bos", action="store_true", help="prepend the begin-of-sentence token")
    e.add_argument("--tokens", action="store_true", help="print id<TAB>token-text lines instead")
    e.set_defaults(func=run_encode, late_positionals=("text",))  # `encode DIR --bos TEXT`

    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("tokenizer", type=path, help="tokenizer directory or tokenizer.json")
    # stdin as encode reads it: `encode DIR TEXT | decode DIR` round-trips
    d.add_argument("ids", nargs="*", help="token ids, space- or comma-separated (default: read stdin)")
    d.add_argument("--skip-special-tokens", action="store_true", help="drop BOS/EOS/PAD")
    d.set_defaults(func=run_decode, late_positionals=("ids",))  # `decode DIR --skip-special-tokens 5 6`


def run_train(args: argparse.Namespace) -> int:
    import itertools
    import time
    from pathlib import Path

    from nanoseek.atomic import check_writable
    from nanoseek.data.corpus import is_embedded, tokenizer_documents
    from nanoseek.metrics import progress_bar
    from nanoseek.tokenizer import tokenizer_summary, train_tokenizer

    source = args.data[0] if len(args.data) == 1 else args.data
    max_docs = args.max_docs
    if max_docs is None and is_embedded(source):
        max_docs = EMBEDDED_DEFAULT_DOCS  # the embedded corpus is endless
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"--max-docs must be positive, got {max_docs}")
    if Path(args.out).exists() and not Path(args.out).is_dir():  # found now, not after the training
        raise ValueError(f"--out {args.out} is a file, not a directory")
    if any(Path(args.out).glob("model*.safetensors")):
        # a checkpoint's tokenizer replaced: its weights, trained on the old ids, read the new ones as others
        raise ValueError(
            f"--out {args.out} holds a model checkpoint, whose weights were trained on its tokenizer: "
            "write the new one to another --out"
        )
    check_writable(args.out)  # a read-only disk, or a file above it: found now too
    docs = tokenizer_documents(source, text_field=args.text_field, seed=args.seed)
    chars = read = sampled = 0
    held_out: list[str] = []

    def counted():
        nonlocal chars, read, sampled
        with progress_bar(total=max_docs, desc="tokenizer", unit="doc") as bar:
            for doc in itertools.islice(docs, max_docs):
                chars += len(doc)
                read += 1
                if len(held_out) < 200 and sampled < SAMPLE_CHARS:
                    held_out.append(doc[: SAMPLE_CHARS - sampled])
                    sampled += len(held_out[-1])
                bar.update(1)
                yield doc
            if max_docs is not None:
                bar.total = read  # a corpus of fewer documents than --max-docs ends at 100%, not at 50%

    start = time.perf_counter()
    tok = train_tokenizer(counted(), vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    elapsed = time.perf_counter() - start
    if not held_out:  # (the first documents): a tokenizer of bytes alone is no result
        raise ValueError(f"no documents in {source!r} to train a tokenizer on")
    out = tok.save(Path(args.out))
    if tok.vocab_size < args.vocab_size:
        # BPE stops when no pair is seen min_frequency times: the corpus, not the trainer, is the limit.
        # --max-docs helps only where it cut the corpus short; otherwise every document was read.
        more = (
            "more documents (--max-docs)"
            if read == max_docs
            else "a larger corpus or a lower --min-frequency"
        )
        print(
            f"note: the corpus supports only {tok.vocab_size} tokens at --min-frequency {args.min_frequency}; "
            f"use {more} to reach {args.vocab_size}",
            file=sys.stderr,  # a warning, as the others: stdout holds the summary line alone
        )
    print(
        f"trained on {chars:,} chars in {elapsed:.1f}s: {tokenizer_summary(tok, held_out)}; "
        f"saved tokenizer.json + tokenizer_config.json to {out}"
    )
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from nanoseek.commands.generate import without_bom
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = without_bom(sys.stdin.read()) if args.text is None else args.text
    ids = tok.encode(text, add_bos=args.bos)
    if args.tokens:
        for i in ids:
            print(f"{i}\t{tok.decode([i])!r}")
    else:
        print(" ".join(map(str, ids)))
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = []
    for raw in args.ids or [sys.stdin.read()]:
        for piece in raw.replace(",", " ").split():
            if not (piece.lstrip("-").isascii() and piece.lstrip("-").isdigit()):  # not "²", not "٣"
                raise ValueError(f"not a token id: {piece!r}")
            i = int(piece)
            if not 0 <= i < tok.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size {tok.vocab_size})")
            ids.append(i)
    print(tok.decode(ids, skip_special_tokens=args.skip_special_tokens))
    return 0
