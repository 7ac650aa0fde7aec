"""`nanoseek inspect PRESET_DIR_OR_HUB_NAME`: parameters (total, active), FLOPs and KV-cache bytes per token.

Builds the model on the meta device, so a directory holding only config.json is enough and even
DeepSeek-V3's 671B shape takes a fraction of a second and no memory.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from nanoseek.options import path

    p = sub.add_parser(
        "inspect",
        help="parameters (total / active per token), FLOPs and KV-cache bytes per token of a model",
        description="Exact accounting of a preset, a checkpoint directory or a Hugging Face Hub model (only "
        "config.json is read; a Hub model's alone is fetched).",
    )
    p.add_argument(
        "model",
        type=path,
        help="preset name (tiny, small, deepseek-v3, ...), directory with config.json, or Hub name (owner/name)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="sequence length for the attention FLOPs, causal (default 4096, V3's pretraining length)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from nanoseek.accounting import DEFAULT_SEQ_LEN, account, human, si
    from nanoseek.checkpoint import accounting_config

    seq_len = args.context if args.context is not None else DEFAULT_SEQ_LEN
    if seq_len < 1:
        raise ValueError(f"--context must be >= 1, got {seq_len}")
    config = accounting_config(args.model)
    acc = account(config, seq_len=seq_len)
    if args.json:
        print(json.dumps({"model": str(args.model), **acc.to_dict()}, indent=2))
        return 0

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from nanoseek.commands.generate import colors_refused

    # rich drops colors under NO_COLOR but still wrote bold and italic: no color system is no ANSI at all
    console = Console(color_system=None if colors_refused() else "auto")
    # the name as given: read as markup, `run[lr=3e-4]` lost its tag and `x[/b]` was a MarkupError; and
    # the table as wide as it: wrapped at the table's width, a path was cut mid-word over two lines
    title = Text(f"{args.model}  ({config.model_type})", style="table.title")
    table = Table(title=title, show_header=True, header_style="bold", min_width=title.cell_len)
    table.add_column("component")
    table.add_column("total", justify="right")
    table.add_column("active / token", justify="right")
    for comp, n in acc.params_by_component.items():
        a = acc.active_params_by_component[comp]
        if n or a:
            table.add_row(comp.replace("_", " "), human(n), human(a))
    table.add_row(
        "[bold]main model[/]", f"[bold]{human(acc.total_params)}", f"[bold]{human(acc.active_params)}"
    )
    if acc.mtp_params:
        # the checkpoint's MTP layer holds copies of the embedding and head it shares: a total, not an addend
        table.add_row(
            f"MTP modules (own; {human(acc.mtp_params_with_shared)} with emb/head copies)",
            human(acc.mtp_params),
            "",
        )
    # rendered, then printed as every other line: rich's own write ends the process with exit code 1 at a
    # closed pipe (`nanoseek inspect tiny | head -2`), where every other command exits 141 (`cli.main`)
    with console.capture() as captured:
        console.print(table)
    sys.stdout.write(captured.get())
    ratio = acc.kv_cache_ratio
    # a Llama without grouping (num_key_value_heads = heads) caches what MHA does: not "1.0x more"
    more = "more" if ratio > 1 else "as much"
    lines = [
        f"active fraction        {acc.active_params / acc.total_params:.2%}  "
        f"(active leaves out the input embedding lookup)",
        f"forward FLOPs / token  {si(acc.flops_per_token, 'FLOP')}  "
        f"(2 x active matmul params + attention at causal seq len {acc.seq_len})",
        f"training FLOPs / token {si(acc.training_flops_per_token, 'FLOP')}  (3 x forward"
        + (f"; MTP adds {si(3 * acc.mtp_flops_per_token, 'FLOP')})" if acc.mtp_params else ")"),
    ]
    if acc.attention_variant == "gqa":
        kv = acc.kv_cache_bytes_per_token
        lines += [
            f"KV cache / token       {kv:,} B (GQA, BF16: {config.num_hidden_layers} x 2 x "
            f"{config.num_key_value_heads} KV heads x {config.head_dim})",
            f"MHA would need         {acc.mha_kv_cache_bytes_per_token:,} B  ({ratio:.1f}x {more})",
            f"MLA would need         {acc.mla_kv_cache_bytes_per_token:,} B  "
            f"(GQA caches {kv / acc.mla_kv_cache_bytes_per_token:.2f}x that; V2's d_c = 4 x head_dim, "
            "rope = head_dim / 2)",
        ]
    else:
        lines += [
            f"KV cache / token       {acc.kv_cache_bytes_per_token:,} B (MLA, BF16: {config.num_hidden_layers}"
            f" x ({config.kv_lora_rank}+{config.qk_rope_head_dim}) elements)",
            f"MHA would need         {acc.mha_kv_cache_bytes_per_token:,} B  ({ratio:.1f}x {more})",
        ]
    print("\n".join(lines))
    return 0
