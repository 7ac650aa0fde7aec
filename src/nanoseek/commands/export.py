"""`nanoseek export DIR --gguf OUT [--type f32|f16|bf16|q8_0]`: a checkpoint as a GGUF file for llama.cpp / ollama."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.export import GGUF_TYPES
    from nanoseek.options import path

    p = sub.add_parser(
        "export",
        help="write a checkpoint as a GGUF file that llama.cpp and ollama run",
        description=(
            "Export a checkpoint directory (config.json, safetensors, tokenizer.json) to GGUF, "
            "architecture deepseek2, MTP modules left out. The tokenizer must use the split regex "
            "nanoseek trains today (llama.cpp's 'qwen2'); older runs retrain their tokenizer."
        ),
    )
    p.add_argument(
        "checkpoint", type=path, help="checkpoint directory (e.g. RUN/final) or Hugging Face Hub name"
    )
    p.add_argument("--gguf", required=True, type=path, metavar="OUT", help="the .gguf file to write")
    p.add_argument(
        "--type",
        choices=GGUF_TYPES,
        default="bf16",
        help="weight precision: f32 (exact), f16 (an fp16 checkpoint exactly, half the size), bf16 "
        "(default, half the size) or q8_0 (8-bit blocks of 32)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nanoseek.export import export_gguf
    from nanoseek.options import shell_quoted

    # progress on stderr, the summary alone on stdout: `nanoseek export ... | head -1` read "loading ...",
    # and the closed pipe ended the export (BrokenPipeError at the next write) before the file was written
    s = export_gguf(args.checkpoint, args.gguf, type=args.type, progress=lambda m: print(m, file=sys.stderr))
    print(
        f"wrote {s.path} ({s.bytes / 2**20:.1f} MiB, {s.tensors} tensors, {s.type}, vocab {s.vocab_size}, "
        f"pre-tokenizer {s.pre_tokenizer}); run it with llama.cpp: llama-cli -m {shell_quoted(s.path)}"
    )
    return 0
