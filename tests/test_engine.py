"""Engine correctness: against transformers, against a full recompute, across batching and speculation."""

from __future__ import annotations

import copy
import dataclasses
import gc
import math
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nanoseek.checkpoint import save_model
from nanoseek.config import get_preset
from nanoseek.engine import Engine, EngineCapacityError, SamplingParams
from nanoseek.engine.cache import PagedLatentCache, block_hash
from nanoseek.model.registered import is_plain_linear
from nanoseek.model.transformer import DeepSeekV3


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny ops on a shared 2-core box: one thread avoids OpenMP spin contention.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_config(**kw):
    base = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=256,
        eos_token_id=None,
    )
    base.update(kw)
    return get_preset("tiny").replace(**base)


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    torch.manual_seed(0)
    # Larger init than training's 0.02 so logits are peaked enough for greedy ties to be impossible.
    cfg = small_config()
    cfg.extra["initializer_range"] = 0.1
    return DeepSeekV3(cfg).init_weights(seed=1).eval()


def greedy_reference(model: DeepSeekV3, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Plain greedy decoding by full recompute (no cache): tokens and the log-probs at each step."""
    ids = torch.tensor([prompt])
    out, logps = [], []
    with torch.no_grad():
        for _ in range(n):
            lp = model(ids)[0, -1].float().log_softmax(-1)
            t = int(lp.argmax())
            out.append(t)
            logps.append(lp)
            ids = torch.cat((ids, torch.tensor([[t]])), dim=1)
    return out, logps


PROMPTS = [[3, 17, 99, 4, 250, 8, 61], [400, 2, 9], list(range(20, 61)), [7]]


@pytest.mark.slow
def test_greedy_matches_transformers_generate(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    engine = Engine(model, max_batch_size=4)
    ours = engine.generate(PROMPTS, max_new_tokens=12)
    for prompt, got in zip(PROMPTS, ours, strict=False):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert got == ref[0, len(prompt) :].tolist()


# The engine in both dtypes it serves in: fp32 (exact up to float rounding) and bf16 (what `serve`
# runs on CUDA; its rounding differs between the absorbed and the naive path, so a tolerance).
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


@pytest.fixture(scope="module")
def models(model) -> dict[torch.dtype, DeepSeekV3]:
    return {torch.float32: model, torch.bfloat16: copy.deepcopy(model).to(torch.bfloat16)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("speculative", [False, True])
def test_logprobs_equal_full_recompute_every_step(models, dtype, speculative):
    model, tol = models[dtype], TOL[dtype]
    engine = Engine(model, max_batch_size=4, speculative=speculative, prefill_chunk=16)
    n = 10
    res = engine.generate_detailed(PROMPTS, max_new_tokens=n, logprobs=5, prompt_logprobs=True)
    errors = []  # |engine - recompute| of every log-prob checked
    for prompt, c in zip(PROMPTS, res, strict=False):
        if dtype == torch.float32:
            ref_tokens, ref_lps = greedy_reference(model, prompt, n)
            assert c.token_ids == ref_tokens
        else:  # bf16 greedy can flip at a near tie: check each step against the engine's own prefix
            with torch.no_grad():
                full = model(torch.tensor([prompt + c.token_ids[:-1]]))[0].float().log_softmax(-1)
            ref_lps = list(full[len(prompt) - 1 :])
        assert c.finish_reason == "length"
        for lp, ref in zip(c.logprobs, ref_lps, strict=False):
            errors.append(abs(lp.logprob - float(ref[lp.token_id])))
            top_ids, top_vals = zip(*lp.top, strict=False)
            ref_vals, ref_ids = ref.topk(5)
            if dtype == torch.float32:  # bf16 rounding may swap near-equal runners-up
                assert list(top_ids) == ref_ids.tolist()
                assert torch.allclose(torch.tensor(top_vals), ref_vals, atol=tol)
        with torch.no_grad():
            full = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
        assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(prompt)
        errors += [abs(c.prompt_logprobs[i] - float(full[i - 1, prompt[i]])) for i in range(1, len(prompt))]
    errors_t = torch.tensor(errors)
    if dtype == torch.float32:
        assert errors_t.max() < tol
    else:
        # In bf16 a rounding difference can flip one router's top-k choice, which moves that token's
        # log-prob far: most must agree closely, none wildly.
        assert (errors_t < tol).float().mean() > 0.9 and errors_t.max() < 1.0, errors_t.max()


def test_an_engines_repr_says_what_it_is(model):
    """A notebook shows an engine left as a cell's value by its repr: `<... Engine object at 0x...>`."""
    engine = Engine(model, max_batch_size=3, block_size=8, num_blocks=40)
    engine.add_request([1, 2, 3])
    text = repr(engine)
    assert text.startswith(f"Engine({model.config.model_type}, float32 on cpu, max_batch_size=3, ")
    assert (
        f"cache {engine.cache.usable_blocks} blocks x 8 tokens (0 used)" in text
        and "speculative=False" in text
    )
    assert text.endswith("running=0, waiting=1)")


def test_a_library_users_engine_keeps_freed_step_memory_as_the_cli_does(model, monkeypatch):
    """`tune_malloc` was called by the CLI and the Trainer only: an `Engine` built in a script or notebook
    page-faulted its multi-MB step buffers in again at every step (int8 weights widened per batch)."""
    import nanoseek.engine.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "tune_malloc", lambda: calls.append(1) or True)
    Engine(model, max_batch_size=2, block_size=8, num_blocks=8)
    assert calls == [1]


def test_continuous_batching_matches_one_at_a_time(model):
    solo = [Engine(model).generate([p], max_new_tokens=9)[0] for p in PROMPTS]
    # Small batch, tiny prefill chunks and small blocks: requests queue, prefill over several steps,
    # join while others decode and leave at different times.
    engine = Engine(model, max_batch_size=2, block_size=4, prefill_chunk=5)
    lengths = [9, 4, 9, 6]
    ids = [engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=lengths[0]))]
    got: dict[str, list[int]] = {ids[0]: []}
    steps = 0
    while engine.has_unfinished() or len(ids) < len(PROMPTS):
        if steps in (2, 3, 5) and len(ids) < len(PROMPTS):
            i = len(ids)
            ids.append(engine.add_request(PROMPTS[i], SamplingParams(max_new_tokens=lengths[i])))
            got[ids[-1]] = []
        for ev in engine.step():
            got[ev.request_id].extend(ev.new_token_ids)
        steps += 1
    for i, rid in enumerate(ids):
        assert got[rid] == solo[i][: lengths[i]]
    assert engine.stats()["cache_blocks_used"] == 0


def test_admission_by_need_runs_long_requests_together(model):
    """Admission used to reserve every block a request could ever need (prompt + max_new_tokens), so
    requests asking for long completions (the server's default: the rest of the context) ran one at a
    time in a cache that holds many of them as they are. Blocks are now given as positions need them."""
    engine = Engine(model, max_batch_size=4, block_size=4, num_blocks=9, max_seq_len=32)  # 8 usable
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8], [9]]
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=32 - len(p))) for p in prompts]
    engine.step()
    assert engine.num_running == 4 and engine.num_waiting == 0
    assert engine.stats()["cache_blocks_used"] == 4  # each prompt and its next token: one block
    for rid in ids:
        engine.abort(rid)
    assert engine.stats()["cache_blocks_used"] == 0 and engine.stats()["preemptions"] == 0


def test_a_request_decoding_alone_again_after_a_preemption_reads_its_new_blocks(model):
    """The decode step keeps its batch's slot maps while the batch is the same; a sequence preempted and
    re-admitted comes back in other blocks (its old ones freed, here retaken by a one-token request), so
    the same lone sequence decoding again must read the new ones: its output is plain greedy decoding's."""
    prompt = list(range(1, 9))
    want = greedy_reference(model, prompt, 8)[0]
    engine = Engine(model, block_size=4, num_blocks=7)  # 6 blocks
    engine.add_request(prompt, SamplingParams(max_new_tokens=8))
    for _ in range(4):
        engine.step()
    (seq,) = engine.scheduler.running
    old = list(seq.block_table)
    engine.scheduler.preempt_newest()
    engine.add_request(list(range(300, 311)), SamplingParams(max_new_tokens=1))  # retakes its old last block
    engine.step()  # both prefill; the one-token request finishes
    assert seq.block_table != old and len(seq.block_table) == len(old)
    while engine.has_unfinished():
        engine.step()
    assert seq.tokens[len(prompt) :] == want


@pytest.mark.parametrize("speculative", [False, True])
def test_preempted_requests_generate_what_they_would_alone(model, speculative, monkeypatch):
    """A cache that runs short preempts the newest requests (vLLM's recompute preemption): re-admitted,
    they recompute their tokens and go on. Tokens, logprobs, prompt logprobs, finish reasons and seeded
    samples equal each request's alone, and no event repeats a token, whether a request was preempted
    while decoding or halfway through its prompt."""
    prompts = [PROMPTS[0], PROMPTS[1], list(range(20, 33)), PROMPTS[3], [5, 9, 14]]
    greedy = SamplingParams(max_new_tokens=20, logprobs=2, prompt_logprobs=True)
    stop_at = Engine(model).generate([prompts[2]], greedy)[0][8]
    params = [
        greedy,
        dataclasses.replace(greedy, logprobs=0),
        dataclasses.replace(greedy, stop_token_ids=[stop_at]),
        dataclasses.replace(greedy, temperature=1.0, seed=7),
        dataclasses.replace(greedy, temperature=1.0, seed=8, repetition_penalty=1.3, presence_penalty=0.5),
    ]
    alone = [
        Engine(model, speculative=speculative).generate_detailed([p], [q])[0]
        for p, q in zip(prompts, params, strict=True)
    ]
    # 12 blocks of 4 (48 tokens) for ~130 tokens of requests, prompts prefilled 3 positions a step
    engine = Engine(
        model,
        max_batch_size=5,
        block_size=4,
        num_blocks=13,
        max_seq_len=40,
        prefill_chunk=3,
        speculative=speculative,
    )
    mid_prompt = []  # per preemption: whether the request had generated nothing yet
    sched, preempt = engine.scheduler, engine.scheduler.preempt_newest
    monkeypatch.setattr(
        sched, "preempt_newest", lambda: (mid_prompt.append(sched.running[-1].first_pass), preempt())
    )
    got = engine.generate_detailed(prompts, params)
    stats = engine.stats()
    assert stats["preemptions"] == len(mid_prompt) >= 3 and any(mid_prompt) and not all(mid_prompt)
    assert stats["cache_blocks_used"] == 0 and engine.cache.num_free == engine.cache.usable_blocks
    for a, g in zip(alone, got, strict=True):
        assert g.token_ids == a.token_ids and g.finish_reason == a.finish_reason
        assert [lp.token_id for lp in g.logprobs] == g.token_ids
        assert [[t for t, _ in lp.top] for lp in g.logprobs] == [[t for t, _ in lp.top] for lp in a.logprobs]
        torch.testing.assert_close(
            [lp.logprob for lp in g.logprobs], [lp.logprob for lp in a.logprobs], atol=1e-4, rtol=0
        )
        assert g.prompt_logprobs[0] is None and len(g.prompt_logprobs) == len(a.prompt_logprobs)
        torch.testing.assert_close(g.prompt_logprobs[1:], a.prompt_logprobs[1:], atol=1e-4, rtol=0)
    assert got[2].finish_reason == "stop" and got[0].finish_reason == "length"


def test_a_preempted_requests_own_blocks_are_not_counted_as_prefix_reuse(model):
    """Re-admitted after a preemption, a request matches the blocks it had computed itself (its output
    too): counted as prefix hits, prompts sharing nothing showed a hit rate, and more prompt tokens
    reused than they held, whenever the cache ran short."""
    prompts = [[1 + 40 * i + j for j in range(10)] for i in range(8)]  # no two share a block
    engine = Engine(model, max_batch_size=8, block_size=4, num_blocks=16, max_seq_len=40)
    engine.generate(prompts, max_new_tokens=25)
    stats = engine.stats()
    assert stats["preemptions"] > 0
    assert stats["prefix_cache_hit_blocks"] == 0 and stats["prefix_cache_hit_rate"] == 0.0
    assert stats["prefix_cache_queries"] == 8 * 2  # each prompt's two full blocks, looked up once


def test_a_growing_block_table_maps_only_its_new_block(model, monkeypatch):
    """Blocks are given by need, so in a steady decode batch some row's table grows on most steps (each
    every block_size tokens). Remapping every row's table then (as when the batch changes) took a
    quarter of a 32-row decode step of a small model; a grown table maps its new block only."""
    prompts = [[1 + i] * (1 + 2 * i) for i in range(8)]  # staggered: the rows grow on different steps
    alone = [Engine(model, block_size=4).generate([p], max_new_tokens=12)[0] for p in prompts]
    engine = Engine(model, max_batch_size=8, block_size=4)
    mapped: list[int] = []  # blocks per slot_map call
    slot_map = engine.cache.slot_map
    monkeypatch.setattr(engine.cache, "slot_map", lambda table: mapped.append(len(table)) or slot_map(table))
    assert engine.generate(prompts, max_new_tokens=12) == alone
    # one batch from the first decode step to the last: each block of each table mapped once
    assert 0 < sum(mapped) <= sum(math.ceil((len(p) + 12) / 4) for p in prompts)


def test_admission_stops_at_max_batch_size_and_a_preempted_request_waits_first(model):
    """vLLM's recompute preemption: the preempted request goes back to the front of the waiting queue,
    ahead of requests that never ran, and the running batch never exceeds max_batch_size."""
    engine = Engine(model, max_batch_size=3, block_size=4, num_blocks=9, max_seq_len=32)  # 8 usable
    ids = [
        engine.add_request(p, SamplingParams(max_new_tokens=25)) for p in ([1, 2, 3], [4, 5, 6], [7, 8], [9])
    ]
    while not engine.stats()["preemptions"]:
        engine.step()
        assert engine.num_running <= 3
    assert [s.request_id for s in engine.scheduler.waiting] == [ids[2], ids[3]]


def test_an_engine_that_lost_blocks_fails_instead_of_stepping_forever(model):
    """Every request fits the whole cache, so an empty engine that cannot admit one has leaked blocks:
    generate() raises, naming the free blocks, rather than spinning with nothing to run."""
    engine = Engine(model, max_batch_size=3, block_size=4, num_blocks=9, max_seq_len=32)  # 8 usable
    leaked = [engine.cache.allocate() for _ in range(7)]  # a bug elsewhere that never released them
    with pytest.raises(RuntimeError, match="1 of 8 cache blocks free"):
        engine.generate([[1, 2, 3, 4, 5, 6]], SamplingParams(max_new_tokens=4))
    engine.cache.release(leaked)
    assert len(engine.generate([[1, 2, 3, 4, 5, 6]], SamplingParams(max_new_tokens=4))[0]) == 4


def test_aborting_a_preempted_request_frees_every_block(model):
    """A preempted request waits with no blocks and the tokens it has sent: aborted there, it sends none
    again, and the cache ends as full as it began."""
    engine = Engine(model, max_batch_size=3, block_size=4, num_blocks=9, max_seq_len=32)  # 8 usable
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=25)) for p in ([1, 2, 3], [4, 5, 6], [7, 8])]
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    for _ in range(40):
        for ev in engine.step():
            got[ev.request_id].extend(ev.new_token_ids)
        if engine.scheduler.waiting and engine.scheduler.waiting[0].sent_tokens:
            break
    victim = engine.scheduler.waiting[0]  # preempted after it had sent tokens
    assert victim.preemptions == 1 and victim.block_table == [] and engine.stats()["preemptions"] >= 1
    engine.abort(victim.request_id)
    events = []
    while engine.has_unfinished():
        events += engine.step()
    (ab,) = [e for e in events if e.request_id == victim.request_id]
    assert ab.finish_reason == "abort" and ab.new_token_ids == []
    assert len(got[victim.request_id]) == victim.sent_tokens > 0
    assert engine.stats()["cache_blocks_used"] == 0 and engine.cache.num_free == engine.cache.usable_blocks


def bigram_model() -> DeepSeekV3:
    """A model whose MTP module predicts exactly what the main model will: every draft is accepted.

    Attention and MLP outputs are zeroed, so the main model maps the current token to the next one
    through embedding and head alone; eh_proj passes the next token's embedding through unchanged, so
    the MTP depth computes the same map one token ahead.
    """
    cfg = small_config(num_hidden_layers=2)
    m = DeepSeekV3(cfg).init_weights(seed=3).eval()
    with torch.no_grad():
        for layer in list(m.model.layers) + list(m.model.mtp_layers):
            layer.self_attn.o_proj.weight.zero_()
            mlp = layer.mlp
            if hasattr(mlp, "experts"):
                mlp.experts.down_proj.zero_()
                mlp.shared_experts.down_proj.weight.zero_()
            else:
                mlp.down_proj.weight.zero_()
        mtp = m.model.mtp_layers[0]
        h = cfg.hidden_size
        mtp.eh_proj.weight.zero_()
        mtp.eh_proj.weight[:, :h] = torch.eye(h)
        m.model.embed_tokens.weight.mul_(5.0)
    return m


@pytest.mark.parametrize("dtype", DTYPES)
def test_speculative_greedy_equals_plain_greedy(models, dtype):
    model = models[dtype]
    plain = Engine(model).generate(PROMPTS, max_new_tokens=12)
    spec = Engine(model, speculative=True)
    if dtype == torch.float32:  # in bf16 a verify step's other shapes round differently: near ties flip
        assert spec.generate(PROMPTS, max_new_tokens=12) == plain  # random MTP: drafts mostly rejected
    bigram = bigram_model().to(dtype)
    plain = Engine(bigram).generate(PROMPTS, max_new_tokens=12)
    spec = Engine(bigram, speculative=True)
    assert spec.generate(PROMPTS, max_new_tokens=12) == plain
    stats = spec.stats()
    assert stats["spec_acceptance_rate"] == 1.0
    assert stats["decode_forwards"] < stats["generated_tokens"] * 0.6


def test_speculative_penalties_and_acceptance_metrics_counted_by_hand():
    """Penalties change what the main model picks, and the MTP draft knows nothing of them: some drafts
    are rejected. The tokens must be plain greedy's under the same penalties, and the metrics count each
    verify step by hand: one draft per step, accepted when the step's first token is that draft. A bonus
    token has its log-probs as any other."""
    model = bigram_model()
    params = SamplingParams(max_new_tokens=12, presence_penalty=1.5, frequency_penalty=1.0, logprobs=2)
    plain = Engine(model).generate_detailed(PROMPTS, params)
    engine = Engine(model, speculative=True)
    drafted = accepted = 0
    for prompt, want in zip(PROMPTS, plain, strict=True):
        seq = engine._requests[engine.add_request(prompt, params)]
        got: list[int] = []
        lps = []
        while engine.has_unfinished():
            draft = None if seq.prefilling else seq.draft
            (ev,) = engine.step()
            if draft is not None:
                hit = ev.new_token_ids[0] == draft
                drafted, accepted = drafted + 1, accepted + hit
                # a rejected draft gives one token; an accepted one a bonus too, unless it ended the request
                assert len(ev.new_token_ids) == 1 + hit or (hit and ev.finished)
            got += ev.new_token_ids
            lps += ev.logprobs
        assert got == want.token_ids
        assert [[t for t, _ in lp.top] for lp in lps] == [[t for t, _ in lp.top] for lp in want.logprobs]
        assert [lp.logprob for lp in lps] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
    stats = engine.stats()
    assert 0 < accepted < drafted  # both outcomes exercised
    assert stats["spec_drafted"] == stats["decode_forwards"] == drafted
    assert stats["spec_accepted"] == accepted and stats["spec_acceptance_rate"] == accepted / drafted


def test_accepted_drafts_advance_both_caches_as_a_fresh_prefill_would(model):
    """The bigram model ignores context, and the random MTP's drafts are rejected: neither shows what an
    accepted draft leaves in the caches. Here every draft is the true greedy token (set by hand): the
    output stays plain greedy's, and the main and MTP cache rows of every computed position equal what a
    fresh prefill of the same tokens computes (the MTP row at i is made with token i + 1)."""
    prompt, n = PROMPTS[0], 12
    want = Engine(model).generate([prompt], max_new_tokens=n)[0]
    engine = Engine(model, block_size=4, speculative=True)
    seq = engine._requests[engine.add_request(prompt, SamplingParams(max_new_tokens=n))]
    while len(seq.tokens) < len(prompt) + n - 2:
        engine.step()
        seq.draft = want[len(seq.tokens) - len(prompt)]  # the token after tokens[-1]
    assert seq.tokens[len(prompt) :] == want[: len(seq.tokens) - len(prompt)]
    stats = engine.stats()  # one prefill, then verify steps only: no accepted position computed again
    assert stats["spec_acceptance_rate"] == 1.0
    assert stats["prefill_forwards"] == 1 and stats["decode_forwards"] == stats["steps"] - 1
    k = seq.num_computed
    got = engine.cache.kv[:, engine.cache.slot_map(seq.block_table)[:k]].clone()
    fresh = Engine(model, block_size=4, speculative=True)
    ref = fresh._requests[fresh.add_request(seq.tokens[:k], SamplingParams(max_new_tokens=2))]
    while ref.prefilling:
        fresh.step()
    expected = fresh.cache.kv[:, fresh.cache.slot_map(ref.block_table)[:k]]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_speculative_needs_an_mtp_module():
    with pytest.raises(ValueError, match="MTP module"):
        Engine(DeepSeekV3(small_config(num_nextn_predict_layers=0)), speculative=True)


def test_speculative_engine_holds_what_a_plain_one_does():
    """A verify step computes [last token, draft] at positions len - 1 and len, and a running sequence
    has len < max_len: the draft never lies past max_len. A cache slot reserved for it anyway refused,
    under speculation only, a request that fills the cache (EngineCapacityError), cost every request
    whose length is a multiple of the block size a block, and took a token off the default context."""
    model = bigram_model()  # every draft accepted: the last verify step puts its draft at max_len - 1
    prompt = list(range(1, 21))
    plain = Engine(model, block_size=16, num_blocks=3).generate([prompt], max_new_tokens=12)
    spec = Engine(model, block_size=16, num_blocks=3, speculative=True)  # 2 blocks: 32 tokens
    assert spec.generate([prompt], max_new_tokens=12) == plain and len(plain[0]) == 12
    assert spec.stats()["spec_acceptance_rate"] == 1.0


def test_speculative_sampling_is_seeded_and_valid(model):
    spec = Engine(model, speculative=True)
    a = spec.generate(PROMPTS, max_new_tokens=8, temperature=0.8, top_k=20, seed=5)
    b = spec.generate(PROMPTS, max_new_tokens=8, temperature=0.8, top_k=20, seed=5)
    assert a == b and all(len(x) == 8 for x in a)


def test_a_seeded_sample_is_the_same_with_speculative_decoding_on_or_off(model):
    """A sampled verify step tested the draft against a uniform of its own, then drew the residual with
    another: a seeded request (`serve --speculative`, `generate --speculative`) gave other tokens than
    without speculation, and other ones again as its drafts moved. It now draws as plain decoding does
    and keeps the draft iff it is that token (accepted with probability p(d), the same distribution)."""
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.95, presence_penalty=0.5, seed=3)
    for m in (model, bigram_model()):  # drafts mostly rejected; drafts often accepted
        plain = Engine(m).generate(PROMPTS, params)
        spec = Engine(m, speculative=True)
        assert spec.generate(PROMPTS, params) == plain
    assert 0 < spec.stats()["spec_accepted"] < spec.stats()["spec_drafted"]


def test_one_bf16_sequence_speculates_on_plain_decodings_kernels(models, monkeypatch):
    """Plain decoding of one bf16 sequence on a CPU runs PyTorch's GEMV (`_gemv_kernels`); its verify
    steps ran oneDNN's GEMM, which rounds otherwise: `generate --speculative` gave other tokens than
    `generate` (greedy and seeded alike) where a near tie fell the other way. The verify step of one
    sequence now runs on the same kernels, so its tokens and log-probs are plain decoding's."""
    model = models[torch.bfloat16]
    seen = []
    hidden_states = model.hidden_states

    def spy(*a, **kw):
        seen.append((a[0].shape[1], torch.backends.mkldnn.enabled))
        return hidden_states(*a, **kw)

    monkeypatch.setattr(model, "hidden_states", spy)
    prompts = [list(range(i, i + 9)) for i in range(100, 400, 74)]
    for temperature in (0.0, 0.8):
        params = SamplingParams(max_new_tokens=30, temperature=temperature, seed=1, logprobs=0)
        for prompt in prompts:
            plain = Engine(model).generate_detailed([prompt], params)[0]
            spec = Engine(model, speculative=True).generate_detailed([prompt], params)[0]
            assert spec.token_ids == plain.token_ids, (temperature, prompt)
            assert [lp.logprob for lp in spec.logprobs] == [lp.logprob for lp in plain.logprobs]
    assert all(not on for width, on in seen if width == 2)  # every verify step: [last token, draft]
    assert torch.backends.mkldnn.enabled


def test_cache_bytes_per_token(model):
    cfg = model.config
    engine = Engine(model, num_blocks=10, block_size=16)
    kv = engine.cache.kv
    per_token = kv.numel() * kv.element_size() / (engine.cache.num_blocks * engine.cache.block_size)
    expected = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert per_token == expected == engine.stats()["cache_bytes_per_token"]
    from nanoseek.accounting import kv_cache_bytes_per_token

    # accounting reports BF16 (2 bytes per element); ours stores the model's dtype (fp32 here).
    assert kv_cache_bytes_per_token(cfg) * 2 == expected


def test_prefix_reuse_shares_blocks_and_keeps_outputs(model):
    system = list(range(100, 140))  # 40 tokens: two full blocks of 16 to share
    prompts = [system + [5, 6], system + [7, 8, 9]]
    fresh = [Engine(model, block_size=16).generate([p], max_new_tokens=6)[0] for p in prompts]
    engine = Engine(model, block_size=16)
    first = engine.generate([prompts[0]], max_new_tokens=6)[0]
    second = engine.generate([prompts[1]], max_new_tokens=6)[0]
    assert [first, second] == fresh
    assert engine.stats()["prefix_cache_hit_blocks"] == 2
    assert engine.stats()["prompt_tokens_reused"] == 32


def test_a_block_whose_python_hash_collides_is_not_shared(model, monkeypatch):
    """Blocks were named by Python's hash((parent, tokens)): 64 bits, computable offline for tuples of
    ints, so a client could craft a prompt whose blocks collide with another user's cached prefix and
    be served their KV rows (vLLM's CVE-2025-25183). Here every block collides with the one at its
    place in any other prompt: the attacker's prompt must still get its own rows."""
    import builtins

    from nanoseek.engine import cache

    real_hash = builtins.hash
    monkeypatch.setattr(cache, "hash", lambda key: real_hash((key[0], len(key[1]))), raising=False)
    secret, attack = list(range(100, 140)), list(range(300, 340))  # two full blocks of 16 each
    alone = Engine(model, block_size=16).generate([attack], max_new_tokens=6)[0]
    engine = Engine(model, block_size=16)
    engine.generate([secret], max_new_tokens=6)
    assert engine.generate([attack], max_new_tokens=6)[0] == alone
    assert engine.stats()["prefix_cache_hit_blocks"] == 0


def test_cache_salt_isolates_prefix_reuse(model):
    """vLLM's `cache_salt`: cached blocks are shared only between requests of the same salt, so one
    tenant cannot learn (from a faster first token) what another's prompts start with."""
    prompt = list(range(100, 140))  # two full blocks of 16 to share
    engine = Engine(model, block_size=16)
    outs = [
        engine.generate([prompt], max_new_tokens=4, cache_salt=salt)[0]
        for salt in ("tenant-a", "tenant-b", None, "tenant-a")
    ]
    assert outs == [outs[0]] * 4
    assert engine.stats()["prefix_cache_hit_blocks"] == 2  # only the last, tenant a's again
    with pytest.raises(ValueError, match="cache_salt must be None or a non-empty string"):
        engine.add_request(prompt, SamplingParams(cache_salt=""))


def test_a_salted_request_shares_its_own_tenants_blocks_and_not_the_unsalted_ones(model):
    """A salted request looks its prefix up under its own salt: an unsalted request's cached blocks are
    another tenant's (no hit), and its own tenant's are shared (both hits)."""
    prompt = list(range(100, 140))  # two full blocks of 16 to share
    engine = Engine(model, block_size=16)
    hits = []
    for salt in (None, "tenant-a", "tenant-a"):
        engine.generate([prompt], max_new_tokens=4, cache_salt=salt)
        hits.append(engine.stats()["prefix_cache_hit_blocks"])
    assert hits == [0, 0, 2]


def test_a_whole_cached_prompt_still_computes_its_last_block(model):
    # at least the last prompt position is computed (its logits give the first token): a prompt of two
    # full cached blocks shares one, as vLLM caps a hit at the prompt's length - 1
    prompt = list(range(100, 132))
    engine = Engine(model, block_size=16)
    first = engine.generate([prompt], max_new_tokens=4)[0]
    assert engine.generate([prompt], max_new_tokens=4)[0] == first
    assert engine.stats()["prefix_cache_hit_blocks"] == 1


def test_an_aborted_half_prefilled_prompt_publishes_only_the_blocks_it_computed(model):
    prompt = list(range(30, 54))  # 6 blocks of 4, prefilled 8 positions a step
    solo = Engine(model, block_size=4).generate([prompt], max_new_tokens=4)[0]
    engine = Engine(model, block_size=4, prefill_chunk=8)
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=4))
    engine.step()
    engine.abort(rid)
    assert engine.generate([prompt], max_new_tokens=4)[0] == solo
    assert engine.stats()["prefix_cache_hit_blocks"] == 2


def test_a_full_cache_evicts_a_freed_prompt_tail_first(model):
    """A finished request's blocks are freed tail first (as vLLM does): a later request that needs a
    few blocks evicts the tail, not the head block every match starts from (which would leave the
    whole cached prefix unreachable)."""
    engine = Engine(model, block_size=4, num_blocks=7, max_seq_len=24)  # 6 usable blocks
    prompt = list(range(100, 113))  # 3 full blocks to share, 4 blocks with its output
    first = engine.generate([prompt], max_new_tokens=3)[0]
    engine.generate([list(range(1, 10))], max_new_tokens=3)  # takes 3 blocks: the 2 unused and one freed
    hits = engine.stats()["prefix_cache_hit_blocks"]
    assert engine.generate([prompt], max_new_tokens=3)[0] == first
    assert engine.stats()["prefix_cache_hit_blocks"] - hits == 3


def test_speculative_prefix_reuse_gives_the_mtp_rows_a_fresh_prefill_would(model):
    """The MTP layer's cached row at a position is computed with the token after it: a block's last
    row holds the next block's first token, which the block's hash does not cover. A prompt sharing the
    blocks but not what follows them must get the MTP rows it would compute alone."""
    system = list(range(100, 108))  # two full blocks of 4
    first, second = system + [5, 6, 7], system + [9, 10, 11]

    def mtp_rows(warm: bool) -> torch.Tensor:
        engine = Engine(model, block_size=4, speculative=True)
        if warm:
            engine.generate([first], max_new_tokens=4)
        seq = engine._requests[engine.add_request(second, SamplingParams(max_new_tokens=3))]
        while seq.prefilling:
            engine.step()
        return engine.cache.kv[-1, engine.cache.slot_map(seq.block_table)[: len(second)]]

    torch.testing.assert_close(mtp_rows(True), mtp_rows(False))


def test_capacity_and_input_errors(model):
    engine = Engine(model, num_blocks=3, block_size=4, max_seq_len=64)
    with pytest.raises(EngineCapacityError, match="cache blocks"):
        engine.add_request(list(range(1, 10)), SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.add_request(list(range(64)), SamplingParams())
    for bad in (512, -1):  # the vocabulary is [0, 512)
        with pytest.raises(ValueError, match=rf"vocabulary \[0, 512\): \[{bad}\]"):
            engine.add_request([1, bad], SamplingParams())
    # a batch refused at its second prompt leaves nothing behind: no request queued, no event to come
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[1, 2], []], max_new_tokens=2)
    assert not engine.has_unfinished() and engine.step() == []
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([1], SamplingParams(temperature=-1))
    # more alternatives than the vocabulary: refused here, not by a crash in step() for the whole batch
    with pytest.raises(ValueError, match="logprobs=513"):
        engine.add_request([1], SamplingParams(logprobs=513))
    (c,) = engine.generate_detailed([[1]], max_new_tokens=1, logprobs=512)  # the whole vocabulary: fine
    assert len(c.logprobs[0].top) == 512
    # a request id names one request in flight (its events, abort()): a second is refused, not merged
    engine.add_request([1], SamplingParams(max_new_tokens=1), request_id="a")
    with pytest.raises(ValueError, match="'a' is already in use"):
        engine.add_request([2], SamplingParams(max_new_tokens=1), request_id="a")
    assert [(e.request_id, e.new_token_ids) for e in engine.step()] == [("a", c.token_ids)]
    engine.add_request([1], SamplingParams(max_new_tokens=1), request_id="a")  # free again once finished
    engine.abort("a")
    assert [e.finish_reason for e in engine.step()] == ["abort"]
    # Requests that fit only one at a time wait their turn instead of failing.
    out = engine.generate([[1, 2, 3], [4, 5, 6]], max_new_tokens=5)
    assert [len(x) for x in out] == [5, 5]


def test_an_engine_given_a_path_or_a_meta_model_says_what_to_pass(model, tmp_path):
    """Engine("runs/x/final") failed with "'str' object has no attribute 'config'", and an Engine over a
    model built on the meta device (no weights) with "Tensor.item() cannot be called on meta tensors"
    from inside its first forward."""
    for path in ("runs/x/final", tmp_path):
        with pytest.raises(TypeError, match=r"got (str|\w*Path) \(load it first: nanoseek.load_model"):
            Engine(path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got Linear"):
        Engine(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Engine: the model has weights on the meta device"):
        Engine(DeepSeekV3.build(model.config, device="meta"))
    with pytest.raises(ValueError, match="save_model: the model has weights on the meta device"):
        save_model(DeepSeekV3.build(model.config, device="meta"), tmp_path / "meta")
    assert not (tmp_path / "meta").exists()  # refused before the directory was made


def test_the_ids_the_engine_gives_skip_those_its_caller_gave(model):
    """A request its caller named "req-0" (the form of the engine's own ids) made the next request added
    without an id, and generate(), which names none, fail: "request id 'req-0' is already in use"."""
    engine = Engine(model)
    named = engine.add_request([1, 2], SamplingParams(max_new_tokens=20), request_id="req-0")
    assert engine.add_request([3, 4], SamplingParams(max_new_tokens=1)) != named
    assert len(engine.generate([[5, 6]], max_new_tokens=2)[0]) == 2


def test_a_request_that_fills_the_cache_exactly_runs_and_one_position_more_is_refused(model):
    """A request needs its max_len positions in whole blocks: one that fills the cache exactly runs
    (under speculation too: its only output token needs no slot for a draft after it), and one position
    more is refused up front, not admitted to wait for blocks that can never free up."""
    for speculative in (False, True):
        engine = Engine(model, num_blocks=3, block_size=4, speculative=speculative)  # 2 blocks: 8 positions
        assert len(engine.generate([list(range(1, 8))], max_new_tokens=1)[0]) == 1
        with pytest.raises(EngineCapacityError, match="needs 3 cache blocks"):
            engine.add_request(list(range(1, 9)), SamplingParams(max_new_tokens=1))


def test_a_request_waiting_for_blocks_keeps_its_place_ahead_of_later_ones(model):
    """First come, first served: a request the cache cannot hold yet stays at the head of the line, and
    a smaller one that came after it is not admitted first (it could be again and again: starvation)."""
    engine = Engine(model, num_blocks=7, block_size=4)  # 6 blocks
    a = engine.add_request(list(range(1, 9)), SamplingParams(max_new_tokens=8))  # admitted with 3
    b = engine.add_request(list(range(20, 32)), SamplingParams(max_new_tokens=4))  # needs 4: waits for a
    c = engine.add_request(list(range(40, 44)), SamplingParams(max_new_tokens=2))  # 2 would fit beside a
    admitted: dict[str, int] = {}
    step = 0
    while engine.has_unfinished():
        engine.step()
        for seq in engine.scheduler.running:
            admitted.setdefault(seq.request_id, step)
        step += 1
    assert admitted[a] < admitted[b] <= admitted[c]


def test_a_refused_engine_leaves_the_model_as_given(model, monkeypatch):
    """quantize= and pack_weights= change the model in place: an Engine refused for its context or
    cache did so first, so the caller's model came back int8 (and packed) from a failed call."""
    from nanoseek.engine import packed
    from nanoseek.engine.packed import is_packed
    from nanoseek.engine.quantize import is_quantized

    monkeypatch.setattr(packed, "PACK_MIN_ELEMENTS", 0)
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match="beyond the model's context"):
        Engine(m, quantize="int8", pack_weights=True, max_seq_len=10**6)
    with pytest.raises(ValueError, match="needs more KV cache"):
        Engine(m, quantize="int8", pack_weights=True, max_seq_len=200, cache_bytes=4096)
    assert not is_quantized(m) and not is_packed(m)


def test_w8a8_off_a_cpu_is_refused_before_any_weight_is_quantized(model, monkeypatch):
    """w8a8 runs on PyTorch's quantized CPU backend: on a GPU it was refused by `pack_w8a8`, after
    `quantize_model` had replaced every linear (the caller's model came back quantized). A model on
    another device (meta here, as CUDA would be: the Engine's refusal of a meta model set aside) is
    refused first."""
    from nanoseek.engine.quantize import is_quantized

    monkeypatch.setattr("nanoseek.engine.engine.check_model", lambda model, user: None)
    m = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match="w8a8' runs on CPUs.*not on meta"):
        Engine(m, quantize="w8a8")
    assert not is_quantized(m)
    from nanoseek.engine.quantize import check_quantize_device

    with pytest.raises(ValueError, match="not on cuda"):  # said without a GPU to put a model on
        check_quantize_device("w8a8", "cuda")
    check_quantize_device("int8", "cuda")  # weight-only int8 and fp8 run on any device


def test_w8a8_packing_hides_only_the_quantized_tensor_deprecation(monkeypatch):
    """Packing w8a8 weights silences PyTorch's deprecation of quantized tensors, and nothing else: the
    filter ignored every UserWarning raised while packing, whatever it said."""
    import warnings

    from nanoseek.engine import quantize

    if not quantize.w8a8_available():
        pytest.skip("PyTorch's quantized CPU backend is not built in")
    pad = torch.nn.functional.pad

    def pad_and_warn(*args, **kwargs):
        warnings.warn("some other trouble", UserWarning, stacklevel=2)
        return pad(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "pad", pad_and_warn)
    q = torch.randint(-127, 127, (4, 8), dtype=torch.int8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize._w8a8_weight(q, torch.ones(4))
    assert [str(w.message) for w in caught] == ["some other trouble"]


def test_prompts_must_be_token_ids_not_text(model):
    """A prompt given as text is refused with a pointer to the tokenizer: a string of digits was read as
    ids (generate("12") ran prompts [1] and [2]) and float ids were truncated, both silently."""
    engine = Engine(model)
    for prompts in ("12", ["123"], ["hello"], [b"12"]):
        with pytest.raises(ValueError, match="text, not token ids.*encode"):
            engine.generate(prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match="integer token ids.*1.5"):
        engine.generate([[1, 1.5]], max_new_tokens=2)
    assert not engine.has_unfinished()
    # integer ids of any kind are fine: a tensor of prompts, numpy ids
    expect = engine.generate([[1, 2, 3]], max_new_tokens=3)
    assert engine.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3) == expect
    assert engine.generate([torch.tensor([1, 2, 3]).numpy()], max_new_tokens=3) == expect
    with pytest.raises(ValueError, match="flat list"):
        engine.generate(torch.tensor([1, 2, 3]), max_new_tokens=3)


def test_prefill_chunk_bounds_the_padded_prefill_forward(model):
    """Prefill chunks are padded into one batch: a long prompt's remainder batched with short prompts used
    to compute rows x remainder positions (here 3 x 26 with a chunk of 32), a stall far past the chunk."""
    engine = Engine(model, block_size=4, prefill_chunk=32)
    shapes = []
    hidden = engine._hidden

    def record(ids, positions, view):
        if ids.shape[1] > 1:  # a prefill forward (decode is one token per row)
            shapes.append(tuple(ids.shape))
        return hidden(ids, positions, view)

    engine._hidden = record
    prompts = [(PROMPTS[2] * 3)[:90], [5, 6, 7], [8, 9, 10]]
    got = engine.generate(prompts, max_new_tokens=3)
    assert all(rows * width <= 32 for rows, width in shapes), shapes
    assert len(shapes) >= 4  # the long prompt alone needs three
    assert got == [Engine(model).generate([p], max_new_tokens=3)[0] for p in prompts]


def test_stream_stop_is_asked_between_the_steps_of_a_long_prefill(model):
    """`nanoseek chat`'s Ctrl-C was seen only at the first token: a prompt of several prefill chunks
    (minutes on a CPU for a large model) could not be stopped but by ending the program."""
    engine = Engine(model, block_size=4, prefill_chunk=8)
    steps = []
    step = engine.step
    engine.step = lambda: steps.append(1) or step()
    asked = iter([False, False, True])  # stop after two of the five prefill steps
    events = list(engine.stream([(PROMPTS[2] * 3)[:40]], max_new_tokens=3, should_stop=lambda: next(asked)))
    assert events == [] and len(steps) == 2
    assert not engine.has_unfinished() and engine.stats()["cache_blocks_used"] == 0


def test_abort_and_max_seq_len(model):
    engine = Engine(model, max_seq_len=12)
    rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=50))
    engine.step()
    engine.abort(rid)
    events = engine.step()
    assert [(e.request_id, e.finish_reason) for e in events] == [(rid, "abort")]
    assert not engine.has_unfinished() and engine.stats()["cache_blocks_used"] == 0
    (c,) = engine.generate_detailed([[1, 2, 3]], max_new_tokens=50)
    assert len(c.token_ids) == 9 and c.finish_reason == "length"
    # beyond the model's context (serve --max-seq-len): refused, as vLLM does, not served degraded
    with pytest.raises(ValueError, match="beyond the model's context"):
        Engine(model, max_seq_len=model.config.max_position_embeddings + 1)
    # 0 silently meant the default, a negative one failed in the cache ("num_blocks must be >= 2")
    for bad in (0, -5):
        with pytest.raises(ValueError, match=f"max_seq_len must be >= 2, got {bad}"):
            Engine(model, max_seq_len=bad)


def test_aborting_the_last_requests_is_reported_before_the_engine_is_idle(model):
    """has_unfinished() said False as soon as the last requests were aborted: a `while has_unfinished():
    step()` loop ended without their "abort" events, and the next batch's first step handed them over,
    events for requests that batch never made."""
    engine = Engine(model, max_batch_size=1)
    running = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=20))
    waiting = engine.add_request([4, 5], SamplingParams(max_new_tokens=20))
    engine.step()
    engine.abort(running)
    engine.abort(waiting)
    events = []
    while engine.has_unfinished():
        events += engine.step()
    assert [(e.request_id, e.finish_reason) for e in events] == [(running, "abort"), (waiting, "abort")]
    assert engine.stats()["cache_blocks_used"] == 0
    later = engine.add_request([6], SamplingParams(max_new_tokens=1))
    assert [e.request_id for e in engine.step()] == [later]


def test_engine_arguments_are_checked_at_their_limits(model):
    """Each argument's smallest legal value is served and the next one down is refused when built:
    prefill_chunk=0 admitted requests it never prefilled (generate hung), max_seq_len=1 leaves no room
    for a token, a context of exactly max_position_embeddings is the model's own."""
    for name in ("max_batch_size", "block_size", "prefill_chunk"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):  # the argument named
            Engine(model, **{name: 0})
    with pytest.raises(ValueError, match="max_seq_len must be >= 2, got 1"):
        Engine(model, max_seq_len=1)
    with pytest.raises(ValueError, match="cache_bytes must be > 0, got 0"):
        Engine(model, cache_bytes=0)
    ctx = model.config.max_position_embeddings
    assert Engine(model, max_seq_len=ctx).max_seq_len == ctx
    expect = Engine(model).generate([PROMPTS[0]], max_new_tokens=3)
    assert (
        Engine(model, prefill_chunk=1, max_batch_size=1, block_size=1).generate(
            [PROMPTS[0]], max_new_tokens=3
        )
        == expect
    )
    (c,) = Engine(model, max_seq_len=2).generate_detailed([[5]], max_new_tokens=3)
    assert len(c.token_ids) == 1 and c.finish_reason == "length"
    # a cache smaller than one block still holds its scratch block and one block of context
    tiny = Engine(model, cache_bytes=1, block_size=4)
    assert tiny.max_seq_len == 4 and len(tiny.generate([[5, 6]], max_new_tokens=9)[0]) == 2
    assert Engine(model, cache_bytes=1, block_size=4, max_seq_len=4).max_seq_len == 4  # what it holds
    with pytest.raises(ValueError, match="max_seq_len 5 needs more KV cache"):
        Engine(model, cache_bytes=1, block_size=4, max_seq_len=5)


def test_each_request_in_a_step_gets_the_logprobs_it_asked_for(model):
    """vLLM's logprobs: None = none, 0 = the chosen token's only, k = also the top k; requests asking
    differently share a step, and generate_detailed refuses overrides it could not apply to a list."""
    engine = Engine(model, max_batch_size=3)
    asked = [None, 0, 2]
    ids = [engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=1, logprobs=k)) for k in asked]
    events = {e.request_id: e for e in engine.step()}
    got = [events[rid].logprobs for rid in ids]
    assert got[0] is None and [len(lp[0].top) for lp in got[1:]] == [0, 2]
    for call in (engine.generate_detailed, engine.stream):  # stream raised a TypeError in dataclasses
        with pytest.raises(ValueError, match="overrides apply to one SamplingParams"):
            list(call([[1]], [SamplingParams()], max_new_tokens=2))
    # stream takes one SamplingParams per prompt, as generate_detailed does
    params = [SamplingParams(max_new_tokens=n) for n in (1, 3)]
    tokens: dict[str, list[int]] = {}
    for event in engine.stream([[1, 2], [1, 2]], params):
        tokens.setdefault(event.request_id, []).extend(event.new_token_ids)
    assert sorted(len(t) for t in tokens.values()) == [1, 3]


def test_stepping_a_training_model_runs_it_in_eval_mode(model):
    """step() called directly (not through generate) on a model left training: eval mode inside the
    step (routers count no expert load), training mode again after it."""
    model.train()
    loads = {i: r.expert_load.clone() for i, r in model.routers()}
    try:
        engine = Engine(model)
        engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=2))
        while engine.has_unfinished():
            engine.step()
            assert model.training
        assert all(torch.equal(r.expert_load, loads[i]) for i, r in model.routers())
    finally:
        model.eval()


def test_a_stream_sends_each_logprob_and_the_prompt_logprobs_once(model):
    """StepEvent.prompt_logprobs comes with a request's first event only, and each token's logprob
    with the event that carries the token: concatenated, the stream is what generate_detailed returns."""
    params = SamplingParams(max_new_tokens=4, logprobs=2, prompt_logprobs=True)
    (c,) = Engine(model, prefill_chunk=4).generate_detailed([PROMPTS[0]], params)
    events = list(Engine(model, prefill_chunk=4).stream([PROMPTS[0]], params))
    assert len(events) == 4
    assert [e.prompt_logprobs for e in events] == [c.prompt_logprobs, None, None, None]
    assert [t for e in events for t in e.new_token_ids] == c.token_ids
    assert [lp for e in events for lp in e.logprobs] == c.logprobs


def test_a_stop_token_that_is_also_the_last_allowed_one_finishes_with_stop(model):
    # the model's own stop point is reported as "stop" (OpenAI; vLLM's v0 and llama.cpp check it first)
    greedy = Engine(model).generate([PROMPTS[0]], max_new_tokens=6)[0]
    stop = greedy[3]
    n = greedy.index(stop) + 1
    (c,) = Engine(model).generate_detailed([PROMPTS[0]], max_new_tokens=n, stop_token_ids=[stop])
    assert c.token_ids == greedy[:n] and c.finish_reason == "stop"


def test_requests_a_closed_stream_gave_up_send_no_events_later(model):
    """A stream closed early (a consumer that breaks out, chat's Ctrl-C) aborts its requests and frees
    their blocks; their "abort" events used to wait for the next step(), reaching a caller that never
    knew those requests (a KeyError in a loop keyed by its own request ids)."""
    engine = Engine(model, max_batch_size=2, block_size=4, num_blocks=9, max_seq_len=32)
    for _ in engine.stream([[1, 2, 3], [4, 5], [6, 7, 8]], max_new_tokens=20):
        break
    assert not engine.has_unfinished() and engine.stats()["cache_blocks_used"] == 0
    rid = engine.add_request([9, 10], SamplingParams(max_new_tokens=2))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    assert {e.request_id for e in events} == {rid}


def test_a_failing_forward_fails_only_its_requests(model, monkeypatch):
    """A forward that raises (say out of memory on one long prompt) used to leave step() half done: the
    request that tripped it and every other one in flight were lost, and the server's engine thread died.
    Now only the batch that raised fails, with its error; the others finish as if alone."""
    poison = 99
    engine = Engine(model, max_seq_len=64)
    hidden = engine._hidden

    def tripping(ids, positions, view):
        if bool((ids == poison).any()):
            raise RuntimeError("out of memory")
        return hidden(ids, positions, view)

    expect = engine.generate([[1, 2, 3]], max_new_tokens=6)[0]
    monkeypatch.setattr(engine, "_hidden", tripping)
    good = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=6))
    events = engine.step()  # its prefill
    bad = engine.add_request([4, poison, 5], SamplingParams(max_new_tokens=6))
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        events += engine.step()
    for e in events:
        out.setdefault(e.request_id, []).extend(e.new_token_ids)
    (failed,) = [e for e in events if e.request_id == bad]
    assert failed.finish_reason == "error" and "out of memory" in str(failed.error)
    assert out[good] == expect
    assert engine.stats()["cache_blocks_used"] == 0
    with pytest.raises(RuntimeError, match="out of memory"):  # generate() raises it
        engine.generate([[poison]], max_new_tokens=2)
    assert engine.generate([[1, 2, 3]], max_new_tokens=6) == [expect]


def test_default_context_is_what_the_default_cache_holds(model, monkeypatch):
    """A long-context model whose full context exceeds the default cache (DeepSeek-V2-Lite: 163840
    positions, ~17k tokens in 512 MiB) got max_seq_len = its whole context, so `nanoseek serve` refused
    every request that left max_tokens out (EngineCapacityError: it asks for the rest of the context)."""
    import nanoseek.engine.engine as engine_module

    for speculative in (False, True):
        layers = model.config.num_hidden_layers + speculative
        monkeypatch.setattr(engine_module, "DEFAULT_CACHE_BYTES", 9 * 16 * layers * 40 * 4)  # 9 blocks
        engine = Engine(model, speculative=speculative)
        assert engine.max_seq_len == 8 * 16 < model.config.max_position_embeddings
        engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=engine.max_seq_len - 3))
        assert Engine(model, max_seq_len=100).max_seq_len == 100  # asked for: kept
        # asked for more than the cache holds for one sequence: refused when built, as vLLM does, not
        # request by request (the refusal pointed at num_blocks, which `serve` does not expose)
        with pytest.raises(
            ValueError, match=rf"max_seq_len 200 needs more KV cache .* \({engine.max_seq_len} tokens"
        ):
            Engine(model, max_seq_len=200, speculative=speculative)


def test_training_state_untouched(model):
    model.train()
    loads = {i: r.expert_load.clone() for i, r in model.routers()}
    try:
        Engine(model).generate([[1, 2, 3]], max_new_tokens=3)
        assert model.training
        for i, r in model.routers():
            assert torch.equal(r.expert_load, loads[i])
    finally:
        model.eval()


def test_generate_holds_eval_mode_for_the_whole_call(model, monkeypatch):
    # A training model (GRPO's policy) is switched to eval once per call, not around every step:
    # each switch walks every module.
    modes = []
    real_train = type(model).train
    monkeypatch.setattr(model, "train", lambda mode=True: modes.append(mode) or real_train(model, mode))
    model.train()
    try:
        modes.clear()
        Engine(model).generate([[1, 2, 3]], max_new_tokens=6)
        assert modes == [False, True] and model.training
    finally:
        model.eval()


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("changed", ["parameters", "routing_bias"])
def test_weight_updates_are_picked_up(model, speculative, changed):
    """GRPO keeps one engine across optimizer steps: in-place weight changes must take effect, in
    the weights the model derives from its own too (MLA's folds, the MoE's stacked experts; with
    speculation, the MTP layer's, which drafts only on some steps), and in buffers (the routing bias
    of aux-loss-free balancing moves during training): cached prefixes computed before are stale."""
    m = copy.deepcopy(model)
    engine = Engine(m, block_size=4, speculative=speculative)
    prompt = list(range(30, 50))
    before = engine.generate([prompt], max_new_tokens=6)[0]
    with torch.no_grad():
        if changed == "parameters":
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        else:
            for name, b in m.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.add_(torch.randn_like(b) * 5.0)  # large enough to swap the experts chosen
    after = engine.generate([prompt], max_new_tokens=6)[0]
    fresh = copy.deepcopy(m)  # no derived weights cached yet
    assert after == Engine(fresh, speculative=speculative).generate([prompt], max_new_tokens=6)[0]
    assert after != before


def test_a_request_running_across_a_weight_update_publishes_no_blocks(model):
    """Blocks a request completes after the weights changed attend to its rows from before: published,
    a later prompt would match the new weights' recomputed prefix and then those mixed blocks."""
    m = copy.deepcopy(model)
    engine = Engine(m, block_size=4)
    prompt = list(range(100, 108))  # two full blocks
    running = engine._requests[engine.add_request(prompt, SamplingParams(max_new_tokens=12))]
    engine.step()  # its prompt is in the cache
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(1.5)  # an optimizer step while it runs
    engine.add_request(prompt + [1], SamplingParams(max_new_tokens=1))  # the prefix, new weights
    while len(running.tokens) < 13:  # its third block (8..11) completes after the update
        engine.step()
    probe = running.tokens[:12] + [3]
    got = engine.generate_detailed([probe], max_new_tokens=1, logprobs=0)[0]
    with torch.no_grad():
        ref = m(torch.tensor([probe]))[0, -1].float().log_softmax(-1)
    assert got.logprobs[0].logprob == pytest.approx(float(ref[got.token_ids[0]]), abs=1e-4)


def test_replaced_weights_are_served_after_reset_prefix_cache(model):
    """Weights assigned rather than changed in place (`load_state_dict(assign=True)`) move no version
    counter the engine watches: after `reset_prefix_cache()`, as its docstring asks, it serves the new
    weights (the derived folds and stacks too), and it no longer holds the old ones."""
    m = copy.deepcopy(model)
    engine = Engine(m, block_size=4)
    prompt = list(range(30, 50))
    engine.generate([prompt], max_new_tokens=6)
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    old = weakref.ref(next(m.parameters()))
    m.load_state_dict(copy.deepcopy(new.state_dict()), assign=True)
    engine.reset_prefix_cache()
    after = engine.generate([prompt], max_new_tokens=6)[0]
    assert after == Engine(new).generate([prompt], max_new_tokens=6)[0]
    gc.collect()
    assert old() is None


def test_generate_detailed_reports_each_finished_prompt() -> None:
    """`on_finish(i)` fires once per prompt as it finishes (eval's progress bar counts these), and
    watching does not change what is generated."""
    model = DeepSeekV3.build(small_config()).init_weights(0).eval()
    engine = Engine(model, max_batch_size=2)  # three prompts, two slots: they finish at different steps
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    finished: list[int] = []
    watched = engine.generate_detailed(prompts, params, on_finish=finished.append)
    assert sorted(finished) == [0, 1, 2]
    assert [c.token_ids for c in watched] == engine.generate(prompts, params)


@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_run_in_place_equal_gathered_decode(models, dtype, monkeypatch):
    """Large experts decode through the grouped path on their stored weights (no gathered copy);
    small ones gather. fp32: both give the full recompute's greedy tokens; bf16 (rounding differs,
    so a near tie may flip): each step's log-prob agrees with a recompute of the engine's own prefix."""
    from nanoseek.model import moe

    model = models[dtype]
    monkeypatch.setattr(moe, "GATHER_LIMIT", 0)
    assert not any(m.experts.gathers() for m in model.modules() if isinstance(m, moe.MoE))
    res = Engine(model, max_batch_size=4).generate_detailed(PROMPTS, max_new_tokens=8, logprobs=1)
    check_decoded(model, res, dtype)


def check_decoded(
    model: DeepSeekV3, res: list, dtype: torch.dtype, reference: DeepSeekV3 | None = None
) -> None:
    """Decodes of PROMPTS checked: in fp32 the reference's (default: the model's) greedy tokens; in
    bf16 (rounding differs, so a near tie may flip) each step's log-prob against a recompute of the
    engine's own prefix."""
    errors = []
    for prompt, c in zip(PROMPTS, res, strict=True):
        if dtype == torch.float32:
            assert c.token_ids == greedy_reference(reference or model, prompt, len(c.token_ids))[0]
        with torch.no_grad():
            full = model(torch.tensor([prompt + c.token_ids[:-1]]))[0].float().log_softmax(-1)
        errors += [
            abs(lp.logprob - float(ref[lp.token_id]))
            for lp, ref in zip(c.logprobs, full[len(prompt) - 1 :], strict=True)
        ]
    errors_t = torch.tensor(errors)
    assert (errors_t < TOL[dtype]).float().mean() > 0.9 and errors_t.max() < 1.0, errors_t.max()


def test_one_row_bf16_decode_runs_gemv_kernels_and_stays_correct(models, monkeypatch):
    """Batch-1 bf16 decode turns oneDNN off for its forward (PyTorch's GEMV streams weights faster),
    restores it after, and its log-probs agree with a recompute of the engine's own prefix."""
    model = models[torch.bfloat16]
    seen = []
    hidden_states = model.hidden_states

    def spy(*a, **kw):
        seen.append((a[0].shape[0], torch.backends.mkldnn.enabled))
        return hidden_states(*a, **kw)

    monkeypatch.setattr(model, "hidden_states", spy)
    res = Engine(model, max_batch_size=4).generate_detailed([PROMPTS[0]], max_new_tokens=6, logprobs=1)
    assert seen[0][1] and all(not on for rows, on in seen[1:])  # prefill keeps oneDNN, decode not
    assert torch.backends.mkldnn.enabled
    Engine(model, max_batch_size=4).generate(PROMPTS[:2], max_new_tokens=3)
    assert all(on for rows, on in seen if rows > 1)
    c = res[0]
    with torch.no_grad():
        full = model(torch.tensor([PROMPTS[0] + c.token_ids[:-1]]))[0].float().log_softmax(-1)
    errors = [abs(lp.logprob - float(ref[lp.token_id])) for lp, ref in zip(c.logprobs, full[6:], strict=True)]
    assert max(errors) < 0.1, errors


def test_packed_linear_equals_the_plain_one_exactly() -> None:
    """oneDNN's blocked layout holds the same bf16 weight: every row count decode and prefill use
    gives F.linear's output bit for bit, bias (Qwen2's q/k/v) included; the weight unpacks exactly."""
    from nanoseek.engine.packed import PackedLinear, packable

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=True).to(torch.bfloat16)
    if not packable(linear):
        pytest.skip("this PyTorch's oneDNN does not pack bf16 weights")
    packed = PackedLinear(linear)
    with torch.no_grad():
        for shape in [(1, 96), (2, 96), (17, 96), (3, 5, 96)]:
            x = torch.randn(*shape).to(torch.bfloat16)
            assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias)), shape
        # an input in another dtype is multiplied by the unpacked weight in that dtype
        x = torch.randn(3, 96)
        want = F.linear(x, linear.weight.float(), linear.bias.float())
        torch.testing.assert_close(packed(x), want)
    assert torch.equal(packed.weight, linear.weight)


def test_pack_weights_keeps_gathered_experts_and_their_shared_expert_plain(model, monkeypatch):
    """Routed experts small enough that decode gathers them per step (this model's) keep that path, and
    their shared expert stays plain with them (decode appends it to the gathered stack)."""
    from nanoseek.engine import packed
    from nanoseek.engine.packed import PackedLinear, PackedRoutedExperts, packable
    from nanoseek.model.moe import MoE, RoutedExperts

    monkeypatch.setattr(packed, "PACK_MIN_ELEMENTS", 0)
    if not packable(model):
        pytest.skip("this PyTorch's oneDNN does not pack these weights")
    packed_model = copy.deepcopy(model)
    engine = Engine(packed_model, pack_weights=True)
    moes = [m for m in packed_model.modules() if isinstance(m, MoE)]
    assert moes and all(type(m.experts) is RoutedExperts and m.experts.gathers() for m in moes)
    assert not any(isinstance(x, PackedLinear) for m in moes for x in m.shared_experts.modules())
    assert any(isinstance(m, PackedLinear) for m in packed_model.modules())  # the rest is packed
    assert not any(isinstance(m, PackedRoutedExperts) for m in packed_model.modules())
    assert engine.generate(PROMPTS, max_new_tokens=6) == Engine(model).generate(PROMPTS, max_new_tokens=6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_weights_serves_the_same_model_faster_layout(models, dtype, monkeypatch):
    """`Engine(pack_weights=True)` on a CPU: every linear outside MLA's folded projections and every
    non-gathering routed expert is packed in place (no plain copy kept), logits agree with the plain
    model, and decoding stays correct (fp32: the plain model's greedy tokens; bf16: log-probs against
    a recompute of its own prefix). fp16, and matrices below the size threshold, stay plain."""
    from nanoseek.engine import packed
    from nanoseek.engine.packed import PackedLinear, PackedRoutedExperts, is_packed, pack_model, packable
    from nanoseek.model import moe
    from nanoseek.model.attention import MultiHeadLatentAttention

    # weights this small would stay plain and experts this small would gather: pack them all here
    monkeypatch.setattr(moe, "GATHER_LIMIT", 0)
    monkeypatch.setattr(packed, "PACK_MIN_ELEMENTS", 0)
    plain = models[dtype]
    if not packable(plain):
        pytest.skip("this PyTorch's oneDNN does not pack these weights")
    model = copy.deepcopy(plain)
    before = sum(p.numel() for p in model.parameters())
    engine = Engine(model, max_batch_size=4, pack_weights=True)
    assert is_packed(model)
    kinds = {type(m) for m in model.modules()}
    assert PackedLinear in kinds and PackedRoutedExperts in kinds
    mla = {
        id(lin) for m in model.modules() if isinstance(m, MultiHeadLatentAttention) for lin in m.children()
    }
    assert all(id(m) in mla for m in model.modules() if is_plain_linear(m))
    assert isinstance(model.lm_head, PackedLinear)
    assert sum(p.numel() for p in model.parameters()) < before / 3  # the plain copies are gone
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        diff = (model(ids).float() - plain(ids).float()).abs().max()
    assert diff < (0.1 if dtype == torch.bfloat16 else 1e-4), diff
    check_decoded(model, engine.generate_detailed(PROMPTS, max_new_tokens=8, logprobs=1), dtype, plain)
    half = copy.deepcopy(plain).to(torch.float16)
    assert pack_model(half) == 0 and not is_packed(half)
    monkeypatch.setattr(packed, "PACK_MIN_ELEMENTS", 1 << 20)
    assert pack_model(copy.deepcopy(plain)) == 0  # every matrix of this model is below the size


def test_packing_starts_at_a_million_weights() -> None:
    """`PACK_MIN_ELEMENTS` is 2**20 weights: a 1024x1024 matrix is packed, one row fewer stays plain; and
    `pack_model` returns how many modules it packed."""
    from nanoseek.engine.packed import PackedLinear, big_enough, is_packed, pack_model, packable

    assert big_enough(torch.empty(1024, 1024)) and not big_enough(torch.empty(1023, 1024))
    big, small = (1024, 1024), (1024, 1023)  # (in, out): 2**20 and 2**20 - 1024 weights
    model = torch.nn.Sequential(*(torch.nn.Linear(*shape, bias=False) for shape in (big, small, big)))
    if not packable(model):
        pytest.skip("this PyTorch's oneDNN does not pack fp32 weights")
    assert pack_model(model) == 2 and is_packed(model)
    assert [type(m) for m in model] == [PackedLinear, torch.nn.Linear, PackedLinear]


def test_packing_keeps_a_head_tied_to_the_embedding_plain() -> None:
    """A head that shares the embedding's weight (tie_word_embeddings) is not packed: packing would
    drop the shared storage the embedding still reads; an untied head of the same size is packed."""
    from types import SimpleNamespace

    from nanoseek.engine.packed import PackedLinear, pack_model, packable

    for tied in (True, False):
        model = torch.nn.Module()
        model.config = SimpleNamespace(tie_word_embeddings=tied)
        model.embed_tokens = torch.nn.Embedding(1024, 1024)
        model.lm_head = torch.nn.Linear(1024, 1024, bias=False)
        if tied:
            model.lm_head.weight = model.embed_tokens.weight
        if not packable(model):
            pytest.skip("this PyTorch's oneDNN does not pack fp32 weights")
        assert pack_model(model) == (0 if tied else 1)
        assert isinstance(model.lm_head, PackedLinear) != tied


def test_packing_is_refused_where_onednns_product_differs_from_the_plain_one(monkeypatch) -> None:
    """`packable` checks oneDNN's packed product against F.linear on a small weight: a PyTorch whose
    packed GEMM is off (here by 1e-3, a hundred times fp32's tolerance) leaves the model plain."""
    from nanoseek.engine import packed

    model = torch.nn.Linear(8, 8)
    if not packed.packable(model):
        pytest.skip("this PyTorch's oneDNN does not pack fp32 weights")
    real = packed.packed_linear
    monkeypatch.setattr(packed, "packed_linear", lambda x, w, b=None: real(x, w, b) + 1e-3)
    assert not packed.packable(model)


def test_packed_fp32_linear_keeps_its_bias_and_takes_inputs_of_another_dtype() -> None:
    """An fp32 PackedLinear with a bias (Qwen2's q/k/v) gives F.linear's output, bias included; an input
    in another dtype (bf16) is multiplied by the unpacked weight and bias in that dtype."""
    from nanoseek.engine.packed import PackedLinear, packable

    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=True)
    with torch.no_grad():
        linear.bias.fill_(3.0)  # far above the products' error: a dropped bias cannot pass
    if not packable(linear):
        pytest.skip("this PyTorch's oneDNN does not pack fp32 weights")
    packed = PackedLinear(linear)
    x = torch.randn(5, 96)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
        xb = x.to(torch.bfloat16)
        got = packed(xb)
        assert got.dtype == torch.bfloat16
        assert torch.equal(
            got, F.linear(xb, linear.weight.to(torch.bfloat16), linear.bias.to(torch.bfloat16))
        )


def test_packed_routed_experts_unpack_the_experts_asked_for() -> None:
    """`PackedRoutedExperts.expert_weights(sel)` is the dense reference: the chosen experts' matrices, in
    the order asked, exactly as they were before packing."""
    from nanoseek.engine.packed import PackedRoutedExperts, packable
    from nanoseek.model.moe import RoutedExperts

    experts = RoutedExperts(4, 32, 16)
    torch.manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.normal_()
        experts.down_proj.normal_()
    if not packable(experts):
        pytest.skip("this PyTorch's oneDNN does not pack fp32 weights")
    packed = PackedRoutedExperts(experts)
    sel = torch.tensor([3, 1])
    gate_up, down = packed.expert_weights(sel)
    assert torch.equal(gate_up, experts.gate_up_proj.data[[3, 1]])
    assert torch.equal(down, experts.down_proj.data[[3, 1]])
    gate_up, down = packed.expert_weights()
    assert torch.equal(gate_up, experts.gate_up_proj.data) and torch.equal(down, experts.down_proj.data)


def test_a_cpu_cache_takes_memory_as_it_fills_not_at_startup():
    """The KV cache (512 MiB by default) was zeroed whole when the engine was built: all of it resident
    before the first request, as much again as a 0.5 GB model. Zero pages until written now: a fresh
    process's RSS grows by the blocks written, not by the cache's size; unwritten rows still read 0."""
    import subprocess
    import sys

    code = """
import torch
from nanoseek.engine.cache import PagedLatentCache
rss = lambda: next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmRSS"))
before = rss()
cache = PagedLatentCache(2, 448, 64, 1024, 128, torch.bfloat16, "cpu")  # 256 MiB
cache.kv[:, :128] = 1.0  # one block written
assert cache.kv[:, 128:].abs().amax() == 0 and cache.kv.shape == (2, 1024 * 128, 512)
assert cache.kv.data_ptr() % 64 == 0  # aligned as torch's own allocator aligns (vector loads)
print(cache.kv.nbytes, rss() - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    size, grown = map(int, out.stdout.split())
    assert grown < size / 4, (size, grown)


# ------------------------------------------------------------------ properties (hypothesis)
# Each runs a handful of cases in the ci profile (conftest.py); `HYPOTHESIS_PROFILE=explore` draws the
# profile's own number (2000) instead, fresh ones.
EXPLORING = os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci"


def examples(n: int) -> settings:
    return settings() if EXPLORING else settings(max_examples=n)


_SOLO: dict[tuple[int, tuple[int, ...], int], list[int]] = {}


def solo_greedy(model: DeepSeekV3, prompt: list[int], n: int) -> list[int]:
    """The prompt's greedy tokens decoded alone: a fresh engine, a batch of one, no shared prefix."""
    key = (id(model), tuple(prompt), n)
    if key not in _SOLO:
        _SOLO[key] = Engine(model, max_batch_size=1, max_seq_len=64).generate([prompt], max_new_tokens=n)[0]
    return _SOLO[key]


def assert_cache_idle(engine: Engine) -> None:
    """Nothing in flight holds a block: every block free, no reference left, the prefix index sound."""
    cache = engine.cache
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine._requests
    assert cache.num_free == cache.usable_blocks and sorted(cache.free) == list(range(1, cache.num_blocks))
    assert all(info.ref_count == 0 for info in cache.blocks)
    assert all(cache.blocks[b].hash == h for h, b in cache.cached.items())


@st.composite
def workloads(draw):
    """Prompts sharing prefixes (so the prefix cache hits), each with its own length cap, stop id, cache
    salt, the step it arrives at and maybe the step it is cancelled at."""
    stem = draw(st.lists(st.integers(1, 40), min_size=4, max_size=12))
    reqs = []
    for _ in range(draw(st.integers(1, 5))):
        own = draw(st.lists(st.integers(1, 40), min_size=1, max_size=6))
        reqs.append(
            dict(
                prompt=stem[: draw(st.integers(0, len(stem)))] + own,
                max_new=draw(st.integers(1, 16)),
                stop_at=draw(st.none() | st.integers(0, 15)),  # stop at the solo output's token there
                salt=draw(st.sampled_from([None, None, "a"])),
                arrive=draw(st.integers(0, 3)),
                cancel=draw(st.none() | st.none() | st.integers(0, 12)),
            )
        )
    return reqs


def _request(prompt, max_new=16, stop_at=None, salt=None, arrive=0, cancel=None):
    return dict(prompt=prompt, max_new=max_new, stop_at=stop_at, salt=salt, arrive=arrive, cancel=cancel)


@examples(10)
@given(
    reqs=workloads(),
    block_size=st.integers(2, 5),
    max_batch_size=st.integers(1, 4),
    prefill_chunk=st.integers(1, 12),
    spare_blocks=st.sampled_from([0, 0, 1, 2, 3, 12]),  # a cache short enough to preempt
    max_seq_len=st.sampled_from([20, 64]),
    speculative=st.booleans(),
)
@example(  # the small cache preempts; two prompts share a prefix block, one is cancelled mid-decode
    reqs=[
        _request(list(range(1, 13)), max_new=13),
        _request([1, 2, 3, 4, 9]),
        _request(list(range(1, 9)) + [30] * 6, max_new=11, stop_at=8, arrive=1),
        _request([5, 6, 7], max_new=12, salt="a", arrive=2, cancel=7),
    ],
    block_size=2,
    max_batch_size=4,
    prefill_chunk=5,
    spare_blocks=0,
    max_seq_len=64,
    speculative=True,
).via("a preempting workload")
def test_any_schedule_of_greedy_requests_gives_each_its_solo_output_and_frees_the_cache(
    model, reqs, block_size, max_batch_size, prefill_chunk, spare_blocks, max_seq_len, speculative
):
    """Requests arriving at any step, sharing prefixes, preempted by a small cache, cancelled at any
    step: each greedy output is the prompt's alone (cut at its stop id, max_new_tokens or max_seq_len),
    speculating or not; no step runs more rows than max_batch_size nor prefills more than
    prefill_chunk positions (padding included); once all are done every block is free."""
    solo = [solo_greedy(model, r["prompt"], 16) for r in reqs]
    need = max(math.ceil(min(len(r["prompt"]) + r["max_new"], max_seq_len) / block_size) for r in reqs)
    engine = Engine(
        model,
        max_batch_size=max_batch_size,
        block_size=block_size,
        num_blocks=need + 1 + spare_blocks,
        max_seq_len=max_seq_len,
        prefill_chunk=prefill_chunk,
        speculative=speculative,
    )
    sched, plan = engine.scheduler, engine.scheduler.plan

    def checked_plan():
        p = plan()
        assert len(sched.running) <= max_batch_size
        assert len(p.prefill) * max((n for _, n in p.prefill), default=0) <= prefill_chunk
        return p

    sched.plan = checked_plan
    ids: dict[str, int] = {}
    got: list[list[int]] = [[] for _ in reqs]
    reasons: list[str | None] = [None] * len(reqs)
    step = 0
    while step <= 3 or engine.has_unfinished():
        for i, r in enumerate(reqs):
            if r["arrive"] == step:
                stops = [] if r["stop_at"] is None else [solo[i][r["stop_at"]]]
                params = SamplingParams(
                    max_new_tokens=r["max_new"], stop_token_ids=stops, cache_salt=r["salt"]
                )
                ids[engine.add_request(r["prompt"], params)] = i
            if r["cancel"] == step and r["arrive"] <= step:
                engine.abort(next(rid for rid, j in ids.items() if j == i))
        for ev in engine.step():
            i = ids[ev.request_id]
            assert reasons[i] is None, "an event after the request finished"
            got[i] += ev.new_token_ids
            if ev.finished:
                reasons[i] = ev.finish_reason
        step += 1
    for i, r in enumerate(reqs):
        want = solo[i][: min(r["max_new"], max_seq_len - len(r["prompt"]))]
        stop = None if r["stop_at"] is None else solo[i][r["stop_at"]]
        if stop in want:
            want = want[: want.index(stop) + 1]
        if reasons[i] == "abort":
            assert got[i] == want[: len(got[i])]
        else:
            assert got[i] == want and reasons[i] == ("stop" if want[-1] == stop else "length")
    assert_cache_idle(engine)


class PagedCacheMachine(RuleBasedStateMachine):
    """The allocator and prefix index under any sequence of admissions (match the prompt's cached
    blocks, allocate and publish the rest) and finishes, against a model kept here by content: a block
    holds the (salt, token prefix) it was published with until it is allocated again."""

    BS = 2

    def __init__(self) -> None:
        super().__init__()
        self.cache = PagedLatentCache(1, 2, 2, 7, self.BS, torch.float32)
        self.refs = {b: 0 for b in range(1, 7)}
        self.free_order = list(range(1, 7))  # least recently freed first
        self.content: dict[tuple, int] = {}  # (salt, token prefix) -> the block holding its last block
        self.held: list[list[int]] = []

    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            self.free_order.remove(block)
        self.refs[block] += 1

    @rule(
        tokens=st.lists(st.integers(0, 2), max_size=9),
        salt=st.sampled_from([None, "a", "b"]),
        max_blocks=st.integers(0, 5),
    )
    def admit(self, tokens, salt, max_blocks):
        bs = self.BS
        found, hashes = self.cache.match_prefix(tokens, max_blocks, salt)
        want = []
        for i in range(min(max_blocks, len(tokens) // bs)):
            block = self.content.get((salt, tuple(tokens[: (i + 1) * bs])))
            if block is None:
                break
            want.append(block)
        assert found == want and len(hashes) == len(found)
        for block in found:
            self._take(block)
        table = list(found)
        parent = hashes[-1] if hashes else None
        for i in range(len(found), len(tokens) // bs):  # compute and publish the rest, while blocks last
            if not self.free_order:
                with pytest.raises(EngineCapacityError):
                    self.cache.allocate()
                break
            block = self.cache.allocate()
            assert block == self.free_order.pop(0)  # the least recently freed
            self.content = {k: b for k, b in self.content.items() if b != block}  # its old rows are gone
            self.refs[block] = 1
            table.append(block)
            key = (salt, tuple(tokens[: (i + 1) * bs]))
            parent = block_hash(parent, tokens[i * bs : (i + 1) * bs], salt)
            self.cache.register_full_block(block, parent)
            self.content.setdefault(key, block)
        self.held.append(table)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def finish(self, data):
        table = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.cache.release(table)
        for block in reversed(table):  # tail first
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free_order.append(block)

    @rule()
    def reset_prefix_cache(self):
        self.cache.reset_prefix_cache()
        self.content.clear()

    @invariant()
    def blocks_add_up(self):
        cache = self.cache
        assert list(cache.free) == self.free_order
        assert [info.ref_count for info in cache.blocks[1:]] == [self.refs[b] for b in range(1, 7)]
        assert cache.num_used == sum(r > 0 for r in self.refs.values())
        assert all(0 not in table for table in self.held)


TestPagedCacheAllocator = PagedCacheMachine.TestCase
TestPagedCacheAllocator.settings = (
    settings(max_examples=50, stateful_step_count=30) if not EXPLORING else settings(stateful_step_count=50)
)


@examples(8)
@given(
    reqs=st.lists(
        st.fixed_dictionaries(
            dict(
                prompt=st.lists(st.integers(1, 40), min_size=1, max_size=8),
                temperature=st.sampled_from([0.0, 0.6, 1.0, 1.7]),
                top_k=st.sampled_from([0, 1, 3, 40]),
                top_p=st.sampled_from([1.0, 0.9, 0.3]),
                min_p=st.sampled_from([0.0, 0.1]),
                repetition_penalty=st.sampled_from([1.0, 1.3]),
                presence_penalty=st.sampled_from([0.0, 0.5]),
                seed=st.integers(0, 2**16),
                arrive=st.integers(0, 4),
            )
        ),
        min_size=1,
        max_size=4,
    ),
    speculative=st.booleans(),
    block_size=st.integers(2, 5),
)
def test_a_seeded_request_samples_the_same_tokens_whatever_its_batch_mates(
    model, reqs, speculative, block_size
):
    """fp32 (sampling.py): a seeded request's tokens are those it samples alone, plainly decoded, whatever
    the requests beside it, the step it joins at, the block size and speculation."""
    params = [
        SamplingParams(max_new_tokens=8, **{k: v for k, v in r.items() if k not in ("prompt", "arrive")})
        for r in reqs
    ]
    alone = [
        Engine(model, max_batch_size=1, max_seq_len=64).generate([r["prompt"]], p)[0]
        for r, p in zip(reqs, params, strict=True)
    ]
    engine = Engine(model, max_batch_size=4, block_size=block_size, max_seq_len=64, speculative=speculative)
    ids: dict[str, int] = {}
    got: list[list[int]] = [[] for _ in reqs]
    step = 0
    while step <= 4 or engine.has_unfinished():
        for i, r in enumerate(reqs):
            if r["arrive"] == step:
                ids[engine.add_request(r["prompt"], params[i])] = i
        for ev in engine.step():
            got[ids[ev.request_id]] += ev.new_token_ids
        step += 1
    assert got == alone
    assert_cache_idle(engine)


@examples(8)
@given(
    block_size=st.integers(2, 4),
    usable=st.integers(2, 6),
    prompts=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=12), min_size=1, max_size=4),
    refuse_at=st.integers(0, 4),
    speculative=st.booleans(),
)
def test_a_request_too_large_for_the_cache_is_refused_and_leaves_the_engine_usable(
    model, block_size, usable, prompts, refuse_at, speculative
):
    """A request that can never fit is refused up front (EngineCapacityError, naming the blocks), alone or
    within a generate() batch, at any step: it leaves no request queued, no block taken and no event
    behind, and the requests beside it decode as they would alone."""
    engine = Engine(
        model, block_size=block_size, num_blocks=usable + 1, max_seq_len=64, speculative=speculative
    )
    fits = [p[: usable * block_size - 3] for p in prompts]  # each with its 3 tokens fits
    too_long = list(range(1, usable * block_size + 1))  # with one token more than the cache holds
    ids = {engine.add_request(p, SamplingParams(max_new_tokens=1 + i % 3)): i for i, p in enumerate(fits)}
    got: dict[str, list[int]] = {rid: [] for rid in ids}
    for _ in range(refuse_at):
        for ev in engine.step():
            got[ev.request_id] += ev.new_token_ids
    before = (engine.num_waiting, engine.num_running, engine.cache.num_free)
    with pytest.raises(EngineCapacityError, match=f"needs {usable + 1} cache blocks .* has only {usable}"):
        engine.add_request(too_long, SamplingParams(max_new_tokens=1))
    with pytest.raises(EngineCapacityError):
        engine.generate([fits[0], too_long[:-1]], max_new_tokens=2)  # the second: one position too many
    assert (engine.num_waiting, engine.num_running, engine.cache.num_free) == before
    while engine.has_unfinished():
        for ev in engine.step():
            got[ev.request_id] += ev.new_token_ids
    assert [got[rid] for rid in ids] == [solo_greedy(model, fits[i], 16)[: 1 + i % 3] for i in ids.values()]
    assert_cache_idle(engine)
    assert engine.generate([fits[0]], max_new_tokens=1) == [solo_greedy(model, fits[0], 16)[:1]]
