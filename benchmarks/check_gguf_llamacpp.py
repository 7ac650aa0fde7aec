"""Does llama.cpp run a nanoseek GGUF export as nanoseek does? Greedy tokens compared, per prompt and type.

Builds a `tiny`-shaped checkpoint (a tokenizer freshly trained on a few documents, random weights with
non-trivial norms and balancing bias), exports it with `nanoseek export` in f32, bf16 and q8_0, loads
each file with llama-cpp-python (llama.cpp built from source) and, on 8 prompts (English, Japanese,
Chinese, digits, the R1 chat template), reports:
- tokenization: llama.cpp's token ids for the prompt text == nanoseek's;
- greedy: how many of the N new tokens match before the first difference (nanoseek: full forward in
  fp32, the reference path; llama.cpp: greedy argmax over its logits);
- teacher-forced top-1: feeding nanoseek's greedy continuation to llama.cpp, the share of positions
  where llama.cpp's argmax is nanoseek's token (free of the compounding of a greedy divergence);
- the largest logit difference on those positions.

    python benchmarks/check_gguf_llamacpp.py [--new-tokens 16] [--types f32,bf16,q8_0] [--keep DIR]

tests/test_gguf.py runs the same functions (skipped where llama_cpp is not installed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from nanoseek.checkpoint import build_model, save_model
from nanoseek.config import get_preset
from nanoseek.model.transformer import DeepSeekV3, cross_entropy
from nanoseek.tokenizer import BOS, Tokenizer, render_chat, train_tokenizer

DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45, and x = 3.14159!",
    "Add 17 and 25: 7 + 5 = 12, write 2 carry 1; 1 + 2 + 1 = 4. The answer is 42.",
    "吾輩は猫である。名前はまだ無い。答えは42です。",
    "我们的答案是四十二。先计算 17 × 3 = 51，再减去 9 得到 42。",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
]

PROMPTS = [
    "The quick brown fox",
    "Add 17 and 25:",
    "x = 3.14159, y = 2718281828",
    "吾輩は猫である。",
    "我们的答案是",
    "def add(a, b):\n    return",
    render_chat([{"role": "user", "content": "What is 12 + 30?"}]),
    render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "東京は？"}]),
]


@dataclass
class PromptResult:
    type: str
    prompt: str
    same_tokenization: bool
    greedy_prefix: int  # new tokens equal before the first difference
    new_tokens: int
    teacher_forced_top1: float
    max_logit_diff: float


# DeepSeek-V3's YaRN settings at a small scale: 4x the context the RoPE frequencies were made for.
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 256,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


# Shapes beside `tiny` that take other paths through the export: YaRN-extended RoPE as DeepSeek-V3
# ships it; a dense model with a full-rank query (written as q_lora_rank 0, which llama.cpp otherwise
# only accepts at V2-Lite's 26/27 layers) and half-split RoPE dims (reordered into pairs).
VARIANTS: dict[str, tuple[str, dict]] = {
    "": ("tiny", {}),
    "yarn": ("tiny", {"rope_scaling": YARN}),
    "dense": ("tiny-dense", {"rope_interleave": False}),
}


def make_checkpoint(
    directory: Path, seed: int = 0, vocab_size: int = 640, variant: str = "", train_steps: int = 0
) -> tuple[DeepSeekV3, Tokenizer]:
    """A tiny-shaped model (every DeepSeek part, one MTP layer) and its tokenizer, saved to `directory`;
    `variant` picks one of VARIANTS; `train_steps` of AdamW on DOCUMENTS.

    Random weights give flat next-token distributions whose near-ties any rounding flips (nanoseek
    itself, with its weights rounded to bf16, leaves its own f32 greedy path on some prompts): f32
    exactness is tested on them, the rounded types on a briefly trained model, as a user exports."""
    corpus = [f"{d} ({i})" for i in range(40) for d in DOCUMENTS]
    tok = train_tokenizer(corpus, vocab_size=vocab_size - 40, min_frequency=1)
    # The model's vocabulary is a little larger than the tokenizer's, as a padded embedding is.
    preset, changes = VARIANTS[variant]
    config = get_preset(preset).replace(vocab_size=vocab_size, bos_token_id=tok.bos_token_id, **changes)
    torch.manual_seed(seed)
    model = build_model(config).init_weights(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # unit norms would hide a norm written to the wrong tensor
                p.uniform_(0.5, 1.5)
        for _, router in model.routers():
            router.e_score_correction_bias.uniform_(-0.1, 0.1)
    if train_steps:
        rows = [tok.encode(d, add_bos=True) + [tok.eos_token_id] for d in DOCUMENTS]
        x = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
        for i, row in enumerate(rows):
            x[i, : len(row)] = torch.tensor(row)
        targets = x[:, 1:].masked_fill(x[:, 1:] == tok.pad_token_id, -100)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(train_steps):
            loss = cross_entropy(model(x[:, :-1]), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    save_model(model, directory)
    tok.save(directory)
    return model, tok


def prompt_ids(tok: Tokenizer, text: str) -> list[int]:
    """nanoseek's ids for a prompt: BOS + text (a chat prompt already starts with BOS)."""
    return tok.encode(text) if text.startswith(BOS) else tok.encode(text, add_bos=True)


@torch.no_grad()
def nanoseek_greedy(model: DeepSeekV3, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens by full forward passes (the reference path) and the logits that chose them."""
    seq = list(ids)
    for _ in range(n):
        logits = model(torch.tensor([seq]))[0, -1]
        seq.append(int(logits.argmax()))
    all_logits = model(torch.tensor([seq]))[0, len(ids) - 1 : -1].float().numpy()
    return seq[len(ids) :], all_logits


def llamacpp_model(path: Path, n_ctx: int = 512):  # noqa: ANN201 - llama_cpp is optional
    import llama_cpp.llama_cpp as C
    from llama_cpp import Llama

    from nanoseek.perf import cpu_info

    # On a CPU with AMX, llama.cpp 0.3.36 puts Q8_0 weights in its AMX buffers, then aborts building the
    # context (GGML_ASSERT(*cur_backend_id != -1): no backend runs DeepSeek2's batched per-head MLA
    # products on them), taking the process with it. There it loads without those extra buffers, as
    # llama-cli's --no-repack; `Llama` has no argument for it, so its default parameters are wrapped.
    default_params = C.llama_model_default_params

    def params():  # noqa: ANN202
        mp = default_params()
        mp.use_extra_bufts = False
        return mp

    if "amx_int8" in cpu_info()["flags"].split():
        C.llama_model_default_params = params
    # An f32 KV cache (llama.cpp's default is f16): the comparison is about the exported weights, and
    # an f16 latent would add its own rounding to every attention score.
    f32 = 0  # GGML_TYPE_F32
    try:
        return Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=2,
            logits_all=True,
            type_k=f32,
            type_v=f32,
            verbose=False,
        )
    finally:
        C.llama_model_default_params = default_params


def llamacpp_tokenize(llm, text: str) -> list[int]:  # noqa: ANN001
    if text.startswith(BOS):  # the BOS in a rendered chat is a control token: parse it as one
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    return llm.tokenize(text.encode(), add_bos=True, special=True)


def llamacpp_greedy(llm, ids: list[int], n: int) -> list[int]:  # noqa: ANN001
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def llamacpp_logits(llm, ids: list[int], continuation: list[int]) -> np.ndarray:  # noqa: ANN001
    """llama.cpp's logits at the positions that predict each continuation token (teacher forcing)."""
    llm.reset()
    llm.eval(ids + continuation[:-1])
    return np.array(llm.scores[len(ids) - 1 : len(ids) + len(continuation) - 1])


def compare(
    model: DeepSeekV3, tok: Tokenizer, gguf_path: Path, gguf_type: str, new_tokens: int = 16
) -> list[PromptResult]:
    llm = llamacpp_model(gguf_path)
    results = []
    for text in PROMPTS:
        ids = prompt_ids(tok, text)
        ref, ref_logits = nanoseek_greedy(model, ids, new_tokens)
        got = llamacpp_greedy(llm, ids, new_tokens)
        prefix = next((i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), new_tokens)
        forced = llamacpp_logits(llm, ids, ref)
        top1 = float(np.mean(forced.argmax(axis=-1) == np.array(ref)))
        results.append(
            PromptResult(
                type=gguf_type,
                prompt=text,
                same_tokenization=llamacpp_tokenize(llm, text) == ids,
                greedy_prefix=prefix,
                new_tokens=new_tokens,
                teacher_forced_top1=top1,
                max_logit_diff=float(np.abs(forced - ref_logits).max()),
            )
        )
    llm.close()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument(
        "--types",
        default="f32,bf16,q8_0,f32+yarn,f32+dense",
        help="f32, bf16 or q8_0, each optionally +yarn or +dense (VARIANTS)",
    )
    ap.add_argument(
        "--train-steps", type=int, default=20, help="AdamW steps on the documents (0: random weights)"
    )
    ap.add_argument("--keep", type=Path, default=None, help="write checkpoint and GGUF files here")
    ap.add_argument("--json", action="store_true", help="print the per-prompt results as JSON lines")
    args = ap.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print(
            "llama_cpp is not installed: pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36 (the version measured)"
        )
        return 1
    from nanoseek.export import export_gguf

    # with --json, stdout holds only the JSON lines; the other lines go to stderr
    notes = sys.stderr if args.json else sys.stdout
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        steps = args.train_steps
        models = {"": make_checkpoint(root / "ckpt", train_steps=steps)}
        model, tok = models[""]
        print(
            f"checkpoint: tiny shape, vocab {model.config.vocab_size} (tokenizer {tok.vocab_size}), "
            + (f"{steps} training steps" if steps else "random weights"),
            file=notes,
        )
        for t in args.types.split(","):
            kind, _, variant = t.partition("+")
            ckpt = root / f"ckpt-{variant}" if variant else root / "ckpt"
            if variant not in models:
                models[variant] = make_checkpoint(ckpt, variant=variant, train_steps=steps)
            model, tok = models[variant]
            path = export_gguf(ckpt, root / f"tiny-{t}.gguf", type=kind).path
            results = compare(model, tok, path, t, args.new_tokens)
            for r in results:
                if args.json:
                    print(json.dumps(asdict(r), ensure_ascii=False))
                else:
                    print(
                        f"{t:9s} {r.prompt[:28]!r:34s} tokens {'same' if r.same_tokenization else 'DIFFER'}  "
                        f"greedy {r.greedy_prefix:2d}/{r.new_tokens}  top-1 {r.teacher_forced_top1:6.1%}  "
                        f"max |dlogit| {r.max_logit_diff:.2e}"
                    )
            exact = sum(r.greedy_prefix == r.new_tokens for r in results)
            print(
                f"{t}: {exact}/{len(results)} prompts with all {args.new_tokens} greedy tokens equal, "
                f"teacher-forced top-1 {np.mean([r.teacher_forced_top1 for r in results]):.1%}, "
                f"tokenization equal on {sum(r.same_tokenization for r in results)}/{len(results)}",
                file=notes,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
