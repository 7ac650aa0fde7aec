"""All-to-all volume per training step under expert parallelism, and DeepSeek-V3's memory per GPU.

    python benchmarks/bench_alltoall.py                       # small preset + deepseek-v3, the docs' figures
    python benchmarks/bench_alltoall.py --preset small --batch 64 --seq-len 1024 --ep 8
    python benchmarks/bench_alltoall.py --json
    python benchmarks/bench_alltoall.py --preset small --measure   # + count the bytes a real EP=2 step moves

Volume (docs/scale-plan.md explains each term). Per MoE layer (MTP layers included) and training step
every token sends one copy of its hidden state to each of its top-k experts and gets one back:
  forward dispatch   tokens·k·hidden·b_dispatch  (+ one fp32 scale per 128 channels when FP8)
  forward combine    tokens·k·hidden·b_combine
  backward           the same two again, reversed: the gradient w.r.t. the expert outputs travels the
                     dispatch way, the gradient w.r.t. the expert inputs the combine way.
V3 (§3.3.3) dispatches activations and the activation gradient in FP8 and keeps both combines in BF16.
The MTP module's MoE sees seq_len - 1 positions per sequence (its last position has no target).
`total` is the cluster-wide sum of rows moved (the upper bound: a copy for an expert on the sending
rank itself does not cross a link); `off-rank` assumes uniform routing, so (EP-1)/EP of the copies
leave the rank. With V3's node-limited routing (each token's experts on at most 4 nodes) and
per-node deduplication (a token crosses InfiniBand once per node and fans out over NVLink), the
inter-node dispatch is at most 4·hidden per token instead of 8·hidden, which `ib_bound` prints.

Memory (deepseek-v3): parameters per pipeline stage counted from the model built on the meta device
(as `nanoseek.accounting` does); V3's layout of 2048 H800s: 16-way pipeline, 64-way expert
parallelism over 8 nodes, ZeRO-1 data parallelism over the 2048/16 = 128 ranks of a stage (so each
expert slice is replicated twice). V3 keeps BF16 weights, FP32 gradients and master weights, and
BF16 AdamW moments (§3.3.2, §3.4). Activations per token are an itemized estimate (see
`activation_bytes_per_token_layer`), reported as how many tokens a stage can keep in flight.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from nanoseek.config import ModelConfig, get_preset

GB = 1e9
FP8_SCALE_GROUP = 128
IB_BYTES_PER_S = 50e9  # H800 cluster: 400 Gb/s InfiniBand per GPU (V3 §3.2.2 quotes ~50 GB/s)  # V3's activation tiles: one fp32 scale per 128 channels


# ----------------------------------------------------------------- volume
@dataclass
class AllToAllVolume:
    preset: str
    tokens_per_step: int
    moe_layers: int
    top_k: int
    hidden: int
    ep: int
    dispatch: str
    combine: str
    bytes_per_layer_forward: float
    total_bytes: float  # per step, whole cluster, forward + backward
    off_rank_bytes: float
    gpus: int
    per_rank_bytes: float  # what one GPU sends (and receives) per step, off-rank part
    ib_bound_bytes: float | None  # V3's node-limited, deduplicated inter-node dispatch bound


def _bytes(fmt: str, hidden: int) -> float:
    """Bytes per hidden-state row in a format; FP8 carries one fp32 scale per 128-channel tile."""
    if fmt == "fp8":
        return hidden * 1 + math.ceil(hidden / FP8_SCALE_GROUP) * 4
    if fmt == "bf16":
        return hidden * 2
    if fmt == "fp32":
        return hidden * 4
    raise ValueError(f"unknown format {fmt!r} (fp8, bf16, fp32)")


def moe_layer_count(cfg: ModelConfig, include_mtp: bool = True) -> int:
    n = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if include_mtp:
        n += sum(cfg.is_moe_layer(cfg.num_hidden_layers + d) for d in range(cfg.num_nextn_predict_layers))
    return n


def all_to_all_volume(
    preset: str | ModelConfig,
    batch: int,
    seq_len: int,
    ep: int,
    dispatch: str = "bf16",
    combine: str = "bf16",
    max_nodes: int | None = None,
    gpus: int | None = None,
) -> AllToAllVolume:
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    preset = preset if isinstance(preset, str) else "custom"
    if not cfg.n_routed_experts:
        raise ValueError(f"preset {preset!r} has no routed experts")
    if ep < 1 or cfg.n_routed_experts % ep:
        raise ValueError(f"ep={ep} must divide n_routed_experts={cfg.n_routed_experts}")
    k, h = cfg.num_experts_per_tok or 0, cfg.hidden_size
    tokens = batch * seq_len
    layers = moe_layer_count(cfg)
    # Token-layers through MoE: main layers see every token; MTP depth d sees seq_len - d - 1 per
    # sequence (its last positions have no target), as `DeepSeekV3.mtp_logits` computes them.
    n = cfg.num_hidden_layers
    token_layers = sum(cfg.is_moe_layer(i) for i in range(n)) * tokens + sum(
        batch * max(0, seq_len - d - 1)
        for d in range(cfg.num_nextn_predict_layers)
        if cfg.is_moe_layer(n + d)
    )
    fwd = tokens * k * (_bytes(dispatch, h) + _bytes(combine, h))
    # backward moves the same rows the other way, same formats (V3 §3.3.3)
    total = 2 * token_layers * k * (_bytes(dispatch, h) + _bytes(combine, h))
    off = total * (ep - 1) / ep
    ib = None
    if max_nodes:
        # At most max_nodes remote copies per token cross IB in dispatch (deduplicated per node).
        ib = 2 * token_layers * max_nodes * _bytes(dispatch, h)
    gpus = gpus or ep  # every GPU of the job carries an equal share (PP stages hold disjoint layers)
    return AllToAllVolume(
        preset, tokens, layers, k, h, ep, dispatch, combine, fwd, total, off, gpus, off / gpus, ib
    )


# ---------------------------------------------------------------- memory
@dataclass
class StageMemory:
    stage: int
    layers: str
    non_expert_params: int
    expert_params: int  # all experts of the stage (before EP sharding)
    params_gb: float
    grads_gb: float
    optimizer_gb: float
    states_gb: float
    activation_mb_per_token: float
    tokens_in_flight_at_80gb: int  # one stage per GPU (1F1B-style placement)
    dualpipe_states_gb: float  # DualPipe: a GPU holds stage s and stage PP-1-s (two chunks)
    dualpipe_tokens_at_80gb: int  # tokens per chunk pair that fit beside those states


def stage_parameters(cfg: ModelConfig, pp: int) -> list[tuple[str, int, int]]:
    """(layer range, non-expert params, routed-expert params) per pipeline stage: blocks split evenly,
    embedding on the first stage, final norm + head + MTP on the last (V3's DualPipe puts the
    shallowest and deepest layers on the same rank; the per-rank totals are what matter here)."""
    from nanoseek.checkpoint import build_model

    model = build_model(cfg, device="meta")
    blocks = list(model.model.layers) + list(model.model.mtp_layers)
    n = cfg.num_hidden_layers
    per_block = []
    for b in blocks:
        ne = e = 0
        for name, p in b.named_parameters():
            if ".experts." in f".{name}" and "shared_experts" not in name:
                e += p.numel()
            else:
                ne += p.numel()
        per_block.append((ne, e))
    bounds = [round(i * n / pp) for i in range(pp + 1)]
    out = []
    for s in range(pp):
        lo, hi = bounds[s], bounds[s + 1]
        ne = sum(x for x, _ in per_block[lo:hi])
        e = sum(y for _, y in per_block[lo:hi])
        label = f"{lo}-{hi - 1}"
        if s == 0:
            ne += model.model.embed_tokens.weight.numel()
            label += " +embed"
        if s == pp - 1:
            ne += model.lm_head.weight.numel() + model.model.norm.weight.numel()
            for ne_m, e_m in per_block[n:]:
                ne, e = ne + ne_m, e + e_m
            label += " +head +MTP" if len(blocks) > n else " +head"
        out.append((label, ne, e))
    return out


def activation_bytes_per_token_layer(cfg: ModelConfig, moe: bool = True) -> float:
    """Saved-for-backward bytes per token per block, V3-style (BF16 unless noted), itemized:
    norm inputs are recomputed (V3 §3.4 recomputes RMSNorm and the MLA up-projections), so a block
    keeps its input, the latent inputs of the up-projections, the attention output and softmax
    statistics (FlashAttention-style), and for the MoE the FP8 dispatched inputs, the gate/up outputs,
    the FP8 SwiGLU output (V3 caches it in FP8 for the down-projection), the BF16 expert outputs for
    the gating weights' gradient, and the shared expert's equivalents."""
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    attn = (
        2 * h * 2  # block input + attention-sublayer residual
        + ((cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2  # latents
        + heads * cfg.v_head_dim * 2  # attention output (o_proj input)
        + heads * 4  # log-sum-exp per head
    )
    if not moe:
        inter = cfg.intermediate_size
        return attn + h * 2 + 2 * inter * 2 + inter * 2
    k, i = cfg.num_experts_per_tok or 0, cfg.moe_intermediate_size
    shared = (cfg.n_shared_experts or 0) * i
    routed = k * (h * 1 + 2 * i * 2 + i * 1 + h * 2)
    shared_b = h * 2 + 2 * shared * 2 + shared * 2 if shared else 0
    router = cfg.n_routed_experts * 4  # fp32 scores
    return attn + routed + shared_b + router


def v3_memory(pp: int = 16, ep: int = 64, gpus: int = 2048, hbm_gb: float = 80.0) -> list[StageMemory]:
    cfg = get_preset("deepseek-v3")
    dp = gpus // pp
    edp = dp // ep  # replicas of each expert slice within a stage
    rows = []
    for s, (label, ne, e) in enumerate(stage_parameters(cfg, pp)):
        e_local = e / ep
        params = 2 * (ne + e_local)  # BF16 weights
        grads = 4 * (ne + e_local)  # FP32 gradients (accumulation)
        optim = (4 + 2 + 2) * (ne / dp + e_local / edp)  # FP32 master + BF16 m, v; ZeRO-1 sharded
        lo, hi = (int(x) for x in label.split()[0].split("-"))
        per_token = sum(activation_bytes_per_token_layer(cfg, cfg.is_moe_layer(i)) for i in range(lo, hi + 1))
        if "MTP" in label:
            per_token += cfg.num_nextn_predict_layers * activation_bytes_per_token_layer(cfg)
            per_token += cfg.vocab_size * 2 * (1 + cfg.num_nextn_predict_layers)  # logits (BF16)
        states = params + grads + optim
        free = hbm_gb * GB - states
        rows.append(
            StageMemory(
                s,
                label,
                ne,
                e,
                params / GB,
                grads / GB,
                optim / GB,
                states / GB,
                per_token / 1e6,
                max(0, int(free / per_token)),
                0.0,
                0,
            )
        )
    for r in rows:
        mirror = rows[pp - 1 - r.stage]
        r.dualpipe_states_gb = r.states_gb + mirror.states_gb
        per_pair = (r.activation_mb_per_token + mirror.activation_mb_per_token) * 1e6
        r.dualpipe_tokens_at_80gb = max(0, int((hbm_gb - r.dualpipe_states_gb) * GB / per_pair))
    return rows


# ------------------------------------------------------------ measurement
def _measure_worker(
    rank: int, world: int, port: int, cfg: ModelConfig, batch: int, seq: int, out: str
) -> None:
    """One forward + backward of an expert-parallel model on gloo, counting the all-to-all bytes."""
    import os

    import torch
    import torch.distributed as dist

    from nanoseek.checkpoint import build_model
    from nanoseek.train import expert_parallel
    from nanoseek.train.loop import language_model_loss

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sent = [0]
    real = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None):
        if input.dim() == 2:  # hidden-state rows (the 1-D count exchange is not part of the volume)
            sent[0] += input.numel() * input.element_size()
        return real(output, input, output_split_sizes, input_split_sizes, group=group)

    expert_parallel.dist.all_to_all_single = counting  # type: ignore[attr-defined]
    model = build_model(cfg).init_weights(0)
    expert_parallel.parallelize_experts(model)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg.vocab_size, (batch // world, seq + 1), generator=g)
    loss, _ = language_model_loss(model, ids[:, :-1], ids[:, 1:], mtp_weight=0.3)
    loss.backward()
    total = torch.tensor([float(sent[0])])
    dist.all_reduce(total)
    if rank == 0:
        with open(out, "w") as f:
            f.write(str(int(total.item())))
    dist.destroy_process_group()


def measure(preset: str, batch: int, seq: int, layers: int, vocab: int) -> tuple[int, AllToAllVolume]:
    """Bytes the EP=2 implementation really moves in one fp32 step on 2 gloo processes (a shrunk
    copy of `preset`: `layers` decoder layers, `vocab` tokens) and the formula's figure for it."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    cfg = get_preset(preset).replace(
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=max(seq, 64),
        torch_dtype="float32",
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.NamedTemporaryFile() as tmp:
        mp.spawn(_measure_worker, args=(2, port, cfg, batch, seq, tmp.name), nprocs=2, join=True)
        measured = int(Path(tmp.name).read_text())
    return measured, all_to_all_volume(cfg, batch, seq, 2, "fp32", "fp32")


# ------------------------------------------------------------------ main
def _fmt(b: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=None, help="only this preset (default: small and deepseek-v3)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--ep", type=int, default=None)
    ap.add_argument("--dispatch", default=None, choices=["fp8", "bf16", "fp32"])
    ap.add_argument("--combine", default=None, choices=["bf16", "fp32"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--measure",
        action="store_true",
        help="also run one EP=2 step on 2 gloo processes (a 3-layer copy of the preset) and check the "
        "bytes it moves against the formula",
    )
    args = ap.parse_args()

    # The stated batches: small at nanoseek pretrain's scale on 8 ranks; V3 at its final batch
    # (15360 sequences of 4096 tokens, §4.2) with FP8 dispatch over EP=64, node limit 4.
    cases = {
        "small": dict(
            batch=64, seq_len=1024, ep=8, dispatch="bf16", combine="bf16", max_nodes=None, gpus=None
        ),
        "deepseek-v3": dict(
            batch=15360, seq_len=4096, ep=64, dispatch="fp8", combine="bf16", max_nodes=4, gpus=2048
        ),
    }
    if args.preset:
        cases = {args.preset: cases.get(args.preset, dict(cases["small"]))}
    results = []
    for preset, c in cases.items():
        for key in ("batch", "seq_len", "ep", "dispatch", "combine"):
            if getattr(args, key) is not None:
                c[key] = getattr(args, key)
        try:
            v = all_to_all_volume(
                preset,
                c["batch"],
                c["seq_len"],
                c["ep"],
                c["dispatch"],
                c["combine"],
                c["max_nodes"],
                c["gpus"],
            )
        except (KeyError, ValueError) as e:  # an unknown preset, an --ep that does not divide its experts
            ap.error(str(e).strip("'\""))
        results.append(v)
    memory = v3_memory() if not args.preset or args.preset == "deepseek-v3" else []
    measured_preset = args.preset or "small"
    if args.measure:
        measured, expected = measure(measured_preset, batch=4, seq=64, layers=3, vocab=4096)
    if args.json:
        out = {"all_to_all": [asdict(v) for v in results], "v3_memory": [asdict(m) for m in memory]}
        if args.measure:
            out["measured"] = {"preset": measured_preset, "bytes": measured, "formula": expected.total_bytes}
        print(json.dumps(out))
        return
    for v in results:
        print(
            f"{v.preset}: {v.tokens_per_step:,} tokens/step, {v.moe_layers} MoE layers (MTP incl.), "
            f"top-{v.top_k}, hidden {v.hidden}, EP={v.ep}, dispatch {v.dispatch} / combine {v.combine}"
        )
        print(f"  per MoE layer, forward (dispatch + combine): {_fmt(v.bytes_per_layer_forward)}")
        print(f"  per step, fwd + bwd, all layers:             {_fmt(v.total_bytes)}")
        print(f"  of which off-rank (uniform routing):         {_fmt(v.off_rank_bytes)}")
        print(f"  per GPU per step ({v.gpus} GPUs; sent = received): {_fmt(v.per_rank_bytes)}")
        if v.preset == "deepseek-v3":
            from nanoseek.accounting import H800_FP8_PEAK_FLOPS, flops_per_token

            flops = flops_per_token(get_preset(v.preset), 4096, training=True, include_mtp=True)
            compute_s = flops * v.tokens_per_step / v.gpus / H800_FP8_PEAK_FLOPS
            print(
                f"  per GPU: compute {compute_s:.1f} s/step at the FP8 peak vs. all-to-all "
                f"{v.per_rank_bytes / IB_BYTES_PER_S:.1f} s if it all crossed IB ({IB_BYTES_PER_S / 1e9:.0f} GB/s)"
            )
        if v.ib_bound_bytes is not None:
            print(f"  inter-node dispatch bound (<=4 nodes/token): {_fmt(v.ib_bound_bytes)} whole step")
    if memory:
        print("\ndeepseek-v3 on 2048 GPUs: PP=16, EP=64 (8 nodes), ZeRO-1 DP=128 per stage; GB per GPU")
        print(
            f"{'stage':>5} {'layers':<18} {'params':>7} {'grads':>7} {'optim':>7} {'states':>7} "
            f"{'act MB/tok':>10} {'tokens@80GB':>11} {'DualPipe states':>15} {'tokens':>7}"
        )
        for m in memory:
            print(
                f"{m.stage:>5} {m.layers:<18} {m.params_gb:7.2f} {m.grads_gb:7.2f} {m.optimizer_gb:7.2f} "
                f"{m.states_gb:7.2f} {m.activation_mb_per_token:10.2f} {m.tokens_in_flight_at_80gb:>11,} "
                f"{m.dualpipe_states_gb:15.2f} {m.dualpipe_tokens_at_80gb:>7,}"
            )
    if args.measure:
        print(
            f"\nmeasured ({measured_preset}, 3 layers, 256 tokens, EP=2, fp32): {measured:,} B moved by the all-to-alls; "
            f"formula {int(expected.total_bytes):,} B ({measured / expected.total_bytes:.4f}x)"
        )
    summary = "; ".join(
        f"{v.preset}: {_fmt(v.total_bytes)}/step ({_fmt(v.per_rank_bytes)} per rank)" for v in results
    )
    print(f"\nall-to-all volume per step: {summary}")


if __name__ == "__main__":
    main()
