"""`nanoseek generate DIR PROMPT` (or `--prompt PROMPT`): complete a prompt with a checkpoint, streaming to stdout.

The generation flags defined here are shared with `nanoseek chat`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any


def without_bom(text: str) -> str:
    """Text read from stdin without the byte-order mark a Windows editor or a PowerShell pipe puts before
    it: the file's, not the text's (and no whitespace to `str.strip`, so it stayed in the prompt)."""
    return text.removeprefix("\ufeff")


def add_generation_flags(
    p: argparse.ArgumentParser, max_new_tokens: int = 256, temperature: float = 0.0
) -> None:
    from nanoseek.options import add_options, defer
    from nanoseek.perf import AUTO_DTYPE_HELP, DEVICE_HELP, DTYPE_CHOICES, QUANTIZE_FORMATS, QUANTIZE_HELP

    g = p.add_argument_group("generation")

    def sampling_flags(_: argparse.ArgumentParser) -> None:
        # imported here, when the command is parsed: nanoseek.engine loads torch (`options.defer`)
        from nanoseek.engine import SamplingParams
        from nanoseek.engine.sampling import GENERATION_DEFAULT_FIELDS

        defaults = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        add_options(g, SamplingParams, defaults=defaults)
        # A flag left out takes the checkpoint's generation_config.json value (Qwen2.5's top_k 20,
        # `do_sample: false`, a max_new_tokens), as `serve` does for a request that leaves the field out:
        # chat sampled a model its server decodes greedily. None marks a flag left out; the command's own
        # value is the fallback where the file says nothing.
        fallbacks = {}
        for action in g._group_actions:
            if action.dest in GENERATION_DEFAULT_FIELDS:
                fallbacks[action.dest] = action.default
                # add_options wrote each of these fields' default into its help: every one has a default
                assert action.help is not None
                action.help = action.help.replace(
                    "(default: %(default)s)",
                    f"(default: the checkpoint's generation_config.json, else {action.default})",
                )
                action.default = None
        p.set_defaults(sampling_fallbacks=fallbacks)

    defer(p, sampling_flags)
    g.add_argument("--quantize", choices=QUANTIZE_FORMATS, default=None, help=QUANTIZE_HELP)
    g.add_argument("--speculative", action="store_true", help="draft tokens with the model's MTP module")
    g.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help=AUTO_DTYPE_HELP,
    )
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--device", default=None, help=DEVICE_HELP)


def colors_refused() -> bool:
    """Whether the environment asks for no ANSI styling, even on a terminal: NO_COLOR set (no-color.org),
    or TERM=dumb, whose terminal prints the escapes as text. `nanoseek inspect`'s table reads it too."""
    return bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"


def sampling_params(
    args: argparse.Namespace, generation_config: dict | None = None, source: Any = "generation_config.json"
) -> Any:
    """The generation flags as validated SamplingParams, a flag left out taking the checkpoint's
    `generation_config` value (`file_sampling_defaults`), else the command's default. Built once before
    the model loads (no file yet), so bad flags fail first, and again with the file; the tokenizer's
    stop ids are attached later with `dataclasses.replace`."""
    from nanoseek.engine import SamplingParams
    from nanoseek.options import from_options

    file = file_sampling_defaults(args, generation_config, source)
    left_out = {k: v for k, v in getattr(args, "sampling_fallbacks", {}).items() if getattr(args, k) is None}
    params = from_options(SamplingParams, args, **{k: file.get(k, v) for k, v in left_out.items()})
    params.validate()
    return params


def file_sampling_defaults(
    args: argparse.Namespace, generation_config: dict | None, source: Any = "generation_config.json"
) -> dict[str, float]:
    """The sampling values the checkpoint's `generation_config` (read from `source`) gives the flags left
    out, read as `serve` reads them for a request; a bad value in the file is refused only where its flag
    is left out (a flag given is the user's fix for it)."""
    from nanoseek.engine.sampling import GENERATION_DEFAULT_FIELDS, generation_defaults

    left_out = {k for k in getattr(args, "sampling_fallbacks", {}) if getattr(args, k) is None}
    cfg = {
        k: v
        for k, v in (generation_config or {}).items()
        if k in left_out or k not in GENERATION_DEFAULT_FIELDS
    }
    return {k: v for k, v in generation_defaults(cfg, source).items() if k in left_out}


def speculation(model: Any, asked: bool) -> bool:
    """Whether `--speculative` (generate, chat, serve) drafts with the model's MTP module: a model without
    one (a GQA family's, a checkpoint transformers saved) is said so on stderr and decoded plainly."""
    if asked and not model.config.num_nextn_predict_layers:
        print("nanoseek: this checkpoint has no MTP module; decoding without speculation", file=sys.stderr)
        return False
    return asked


def load_for_generation(
    args: argparse.Namespace, max_batch_size: int = 1, chat: bool = False
) -> tuple[Any, Any, Any]:
    """(engine, tokenizer, model) from a checkpoint directory, with a clear error if parts are missing.
    `chat` (`nanoseek chat`; `generate --chat` too): the tokenizer must have a chat template, and one
    with a non-thinking mode where `--no-think` asks for it, said before the weights load."""
    from nanoseek.checkpoint import load_model, resolve_checkpoint, resolve_device
    from nanoseek.engine import Engine
    from nanoseek.engine.quantize import check_quantize_device
    from nanoseek.engine.sampling import refuse_identical_samples
    from nanoseek.evaluate import prompt_opens_think
    from nanoseek.perf import default_device
    from nanoseek.tokenizer import checkpoint_tokenizer

    # a device this machine lacks, w8a8 off a CPU: said before a Hub name's download, not after it
    device = resolve_device(args.device or default_device())
    if args.quantize:
        check_quantize_device(args.quantize, device)
    directory = resolve_checkpoint(args.dir, tokenizer=True)
    tokenizer = checkpoint_tokenizer(directory)  # one from another model: said before the weights load
    if (chat or getattr(args, "chat", False)) and tokenizer.chat_template is None:
        # a base model of another family: R1's markup reached it spelled out byte by byte and its whole
        # reply was shown as reasoning; transformers and vLLM refuse it too
        how = (
            "continue the text without --chat"
            if not chat
            else f"continue a text with `nanoseek generate {args.dir} PROMPT`"
        )
        raise ValueError(f"{args.dir} has no chat template (a base model?): {how}")
    if chat and not args.think and prompt_opens_think(tokenizer, thinking=False):
        # R1-Distill's template knows no non-thinking mode: its prompt opens the think block whatever the
        # flag, so the model reasons anyway, and that reasoning was shown (and kept) as the answer
        raise ValueError(
            f"--no-think: {args.dir}'s chat template has no non-thinking mode (its prompt opens "
            f"{tokenizer.think_start} either way); chat without the flag to see the reasoning apart"
        )
    # the sampling the flags and the checkpoint's generation_config.json make, refused before the weights
    # load: a value out of range in the file, several samples where it decodes greedily
    params = sampling_params(args, tokenizer.generation_config, directory / "generation_config.json")
    taken = file_sampling_defaults(args, tokenizer.generation_config)
    if taken:  # as serve says it: a checkpoint's `do_sample: false` decodes greedily where the help says 0.6
        shown = ", ".join(f"{k}={v}" for k, v in taken.items())
        print(f"nanoseek: sampling defaults from generation_config.json: {shown}", file=sys.stderr)
    refuse_identical_samples(
        params.temperature, getattr(args, "num_samples", 1), "--num-samples", "the prompt"
    )
    # Quantized as the weights stream in: memory never holds the whole model in args.dtype.
    model = load_model(directory, dtype=args.dtype, device=device, quantize=args.quantize).eval()
    engine = Engine(
        model,
        max_batch_size=max_batch_size,
        quantize=args.quantize,
        speculative=speculation(model, args.speculative),
        pack_weights=True,  # bf16/fp32 on a CPU: oneDNN's layout (engine/packed.py); else a no-op
    )
    return engine, tokenizer, model


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import path

    p = sub.add_parser("generate", help="complete a prompt with a checkpoint (streams to stdout)")
    p.add_argument(
        "dir",
        type=path,
        help="checkpoint directory (config.json, model.safetensors, tokenizer.json) or Hub name (owner/name)",
    )
    # positional as ollama's `run MODEL PROMPT`, or --prompt / -p as llama.cpp's CLI takes it
    p.add_argument("text", nargs="?", metavar="PROMPT", help="text to complete ('-' reads stdin)")
    p.add_argument("--prompt", "-p", help="the prompt, as a flag instead of the positional PROMPT")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    p.add_argument("--num-samples", type=int, default=1, help="completions to draw (batched)")
    add_generation_flags(p)
    p.set_defaults(func=run, late_positionals=("text",))


def run(args: argparse.Namespace) -> int:
    from nanoseek.perf import torch_threads

    # checked and set before a Hub name's resolve (its whole download), the caller's count back after
    # (a notebook's session goes on), as every other command sets --threads
    with torch_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from nanoseek.engine.sampling import refuse_identical_samples
    from nanoseek.tokenizer import IncrementalDecoder

    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if (args.text is None) == (args.prompt is None):
        raise ValueError(
            "give the prompt once: nanoseek generate DIR 'PROMPT' (or --prompt 'PROMPT'; '-' reads stdin)"
        )
    prompt = args.prompt if args.text is None else args.text
    params = sampling_params(args)  # bad flags fail before the model loads and the prompt is echoed
    if args.temperature is not None:  # else the checkpoint's generation_config.json may set one
        refuse_identical_samples(params.temperature, args.num_samples, "--num-samples", "the prompt")
    engine, tok, _ = load_for_generation(args, max_batch_size=args.num_samples)
    params = sampling_params(args, tok.generation_config)
    text = prompt
    if prompt == "-":
        # a file piped in (`generate DIR - < prompt.txt`, `echo TEXT |`): a Windows editor's byte-order
        # mark and CRLF line ends are the file's, not the prompt's, and so is its last line end, which
        # had the model continue "TEXT" on a new line (llama.cpp's `-f` drops it too)
        text = without_bom(sys.stdin.read()).replace("\r\n", "\n").removesuffix("\n")
    if args.chat:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
    else:
        ids = tok.encode(text, add_bos=tok.add_bos_token)
    params = dataclasses.replace(params, stop_token_ids=list(tok.stop_token_ids))
    t0 = time.perf_counter()
    n_tokens = 0
    cut = 0  # completions the context ended short of max_new_tokens
    if args.num_samples == 1:
        # primed with the prompt: a SentencePiece decoder strips a text's leading space ("isParis")
        decoder = IncrementalDecoder(tok, skip_special_tokens=True, context=ids)
        events = engine.stream([ids], params)  # a prompt over the context fails here, before the echo
        if not args.chat:
            sys.stdout.write(text)
        for ev in events:
            n_tokens += len(ev.new_token_ids)
            sys.stdout.write(decoder.push(ev.new_token_ids))
            sys.stdout.flush()
            cut += ev.finish_reason == "length" and n_tokens < params.max_new_tokens
        # a completion cut inside a character ends before it (as the server's), not with U+FFFD
        sys.stdout.write(decoder.flush(drop_partial=True) + "\n")
    else:
        outs = engine.generate_detailed([ids] * args.num_samples, params)
        for i, done in enumerate(outs):
            out = done.token_ids
            n_tokens += len(out)
            cut += done.finish_reason == "length" and len(out) < params.max_new_tokens
            print(f"--- sample {i + 1}/{len(outs)}")
            decoder = IncrementalDecoder(tok, skip_special_tokens=True, context=ids)
            print(("" if args.chat else text) + decoder.push(out) + decoder.flush(drop_partial=True))
    dt = time.perf_counter() - t0
    s = engine.stats()
    spec = (
        f", MTP acceptance {s['spec_acceptance_rate']:.0%}" if s["spec_acceptance_rate"] is not None else ""
    )
    print(
        f"nanoseek generate: {n_tokens} tokens from a {len(ids)}-token prompt in {dt:.2f}s "
        f"({n_tokens / max(dt, 1e-9):.1f} tok/s, {str(engine.dtype).removeprefix('torch.')}{spec})",
        file=sys.stderr,
    )
    if cut:
        # the engine ends a completion at its context (max_seq_len; a server refuses such a request): said,
        # or the shorter text read as the model's own end
        which = "the completion" if args.num_samples == 1 else f"{cut} of {args.num_samples} completions"
        print(
            f"nanoseek generate: {which} stopped at the context's end ({engine.max_seq_len} "
            f"tokens, the prompt's included), short of max_new_tokens {params.max_new_tokens}",
            file=sys.stderr,
        )
    return 0
