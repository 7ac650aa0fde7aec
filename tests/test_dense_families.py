"""The dense families R1 distils into (Qwen2, Llama), as configurations of nanoseek's own blocks.

Same weights, same logits as transformers' Qwen2ForCausalLM / LlamaForCausalLM (fp32, 1e-4), both
ways: random transformers models saved with `save_pretrained` and loaded by `nanoseek.load_model`,
and nanoseek models saved with `save_model` and read by `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoseek
from model_configs import assert_greedy
from nanoseek.checkpoint import build_model, save_model
from nanoseek.config import ModelConfig, get_preset
from nanoseek.model.gqa import GroupedQueryAttention

transformers = pytest.importorskip("transformers")

from test_hf_interop import TOL, assert_close, ids_for, randomize_  # noqa: E402

VOCAB = 96
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def hf_kwargs(**changes) -> dict:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return {**base, **changes}


# name -> (transformers config class name, its kwargs); GQA ratios 1, 2 and 4 among them.
CONFIGS = {
    "qwen2_untied_gqa2": ("Qwen2Config", hf_kwargs()),
    "qwen2_tied_gqa4": ("Qwen2Config", hf_kwargs(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2_tied_mha": ("Qwen2Config", hf_kwargs(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_nobias_gqa2": ("LlamaConfig", hf_kwargs()),
    "llama_bias_llama3_gqa4": (
        "LlamaConfig",
        hf_kwargs(num_attention_heads=8, head_dim=16, attention_bias=True, rope_scaling=LLAMA3),
    ),
    "llama_tied_llama3_mha": (
        "LlamaConfig",
        hf_kwargs(num_key_value_heads=4, tie_word_embeddings=True, rope_scaling=LLAMA3),
    ),
}


def hf_model(name: str, seed: int = 0):
    cls_name, kw = CONFIGS[name]
    hc = getattr(transformers, cls_name)(**kw)
    model = transformers.AutoModelForCausalLM.from_config(hc)
    randomize_(model, seed)
    return model.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_to_nanoseek(tmp_path, name):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path).eval()
    cfg = ours.config
    assert cfg.attention_variant == "gqa" and not cfg.is_moe and cfg.num_nextn_predict_layers == 0
    assert all(isinstance(layer.self_attn, GroupedQueryAttention) for layer in ours.model.layers)
    if cfg.tie_word_embeddings:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ids = ids_for(40)  # past llama3's original_max_position_embeddings
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_nanoseek_to_transformers(tmp_path, name):
    cfg = ModelConfig.from_dict(getattr(transformers, CONFIGS[name][0])(**CONFIGS[name][1]).to_dict())
    ours = build_model(cfg).init_weights(seed=2).eval()
    randomize_(ours, seed=3)
    save_model(ours, tmp_path / "ckpt")
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "kv_lora_rank" not in written and "n_routed_experts" not in written  # its own family's keys
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    family = "Qwen2ForCausalLM" if cfg.model_type == "qwen2" else "LlamaForCausalLM"
    assert type(ref).__name__ == family
    ids = ids_for(40)
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits)
        again = nanoseek.load_model(tmp_path / "ckpt").eval()
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)


def test_llama3_scaling_is_in_the_comparison():
    """Guard: the llama3 configs would fail if the scaling were ignored (the frequencies differ)."""
    cfg = ModelConfig.from_dict(transformers.LlamaConfig(**CONFIGS["llama_tied_llama3_mha"][1]).to_dict())
    assert cfg.rope_scaling and cfg.rope_scaling["type"] == "llama3"
    plain = build_model(cfg.replace(rope_scaling=None)).init_weights(seed=1).eval()
    scaled = build_model(cfg).init_weights(seed=1).eval()
    ids = ids_for(40)
    with torch.no_grad():
        assert (plain(ids) - scaled(ids)).abs().max() > 1e-3


def test_dense_config_fields_and_errors():
    qwen = ModelConfig.from_dict(transformers.Qwen2Config(**hf_kwargs()).to_dict())
    assert (qwen.qkv_bias, qwen.o_bias, qwen.head_dim, qwen.rope_interleave) == (True, False, 16, False)
    assert qwen.bos_token_id is None and qwen.eos_token_id is None  # not DeepSeek's 0 / 1
    llama = ModelConfig.from_dict(transformers.LlamaConfig(**hf_kwargs(attention_bias=True)).to_dict())
    assert (llama.qkv_bias, llama.o_bias) == (True, True)
    # Qwen2Attention ignores attention_bias: q/k/v biased always, o_proj never (transformers)
    qwen_flagged = ModelConfig.from_dict({**qwen.to_dict(), "attention_bias": True})
    assert (qwen_flagged.qkv_bias, qwen_flagged.o_bias) == (True, False)
    # a dense family has no experts and no MTP, even when a change asks for them
    changed = qwen.replace(num_nextn_predict_layers=1, n_routed_experts=8, num_experts_per_tok=2)
    assert changed.num_nextn_predict_layers == 0 and not changed.is_moe
    # A round trip through nanoseek's config.json keeps the family and its fields.
    again = ModelConfig.from_dict(llama.to_dict())
    assert again == llama
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.from_dict({**qwen.to_dict(), "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="num_key_value_heads"):  # not a ZeroDivisionError
        ModelConfig.from_dict({**qwen.to_dict(), "num_key_value_heads": 0})
    with pytest.raises(ValueError, match="head_dim must be even"):  # RoPE rotates pairs of dims
        ModelConfig.from_dict({**qwen.to_dict(), "head_dim": 15})
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.from_dict({**qwen.to_dict(), "use_sliding_window": True})
    with pytest.raises(ValueError, match="mlp_bias"):
        ModelConfig.from_dict({**llama.to_dict(), "mlp_bias": True})
    # an activation other than SwiGLU's would load and run as silu: wrong logits, silently
    for cfg, act in ((llama, "gelu"), (qwen, "relu"), (get_preset("tiny"), "gelu_new")):
        with pytest.raises(ValueError, match=f"hidden_act '{act}' is not supported"):
            ModelConfig.from_dict({**cfg.to_dict(), "hidden_act": act})
    assert ModelConfig.from_dict({**llama.to_dict(), "hidden_act": "swish"})  # transformers' name for silu
    with pytest.raises(ValueError, match="attention_bias is not supported by MLA"):
        ModelConfig.from_dict({**get_preset("tiny").to_dict(), "attention_bias": True})


def test_config_without_model_type_is_the_family_its_architectures_names(tmp_path):
    """A hand-written config.json with no model_type: read as the class `architectures` names (it was
    DeepSeek-V3's MLA, and the Llama weights then refused as "written for another config.json")."""
    ref = hf_model("llama_bias_llama3_gqa4")
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model_type"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = nanoseek.load_model(tmp_path).eval()
    assert ours.config.model_type == "llama"
    ids = ids_for(40)
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits)
    qwen = {**transformers.Qwen2Config(**hf_kwargs()).to_dict(), "architectures": ["Qwen2ForCausalLM"]}
    del qwen["model_type"]
    assert ModelConfig.from_dict(qwen).model_type == "qwen2"
    # a class nanoseek does not read is named, not built as another family
    with pytest.raises(ValueError, match="no model_type, and architectures names 'MistralForCausalLM'"):
        ModelConfig.from_dict({**qwen, "architectures": ["MistralForCausalLM"]})
    # one class written as a string, not a list: that class (it was read as DeepSeek-V3), and no class name
    assert ModelConfig.from_dict({**qwen, "architectures": "Qwen2ForCausalLM"}).model_type == "qwen2"
    with pytest.raises(ValueError, match=r"architectures must be a list of class names, got \{'a': 1\}"):
        ModelConfig.from_dict({**qwen, "architectures": {"a": 1}})
    # no architectures either: DeepSeek-V3's defaults, as before (nanoseek's own presets)
    assert ModelConfig.from_dict({"vocab_size": 128}).model_type == "deepseek_v3"


def test_tiny_qwen2_preset_is_a_qwen2_checkpoint(tmp_path):
    """The distillation student preset: transformers loads what nanoseek saves as Qwen2ForCausalLM."""
    cfg = get_preset("tiny-qwen2")
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings and cfg.num_key_value_heads == 2
    ours = build_model(cfg).init_weights(seed=0).eval()
    save_model(ours, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(ref).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=0, atol=1e-4)


# ------------------------------------------------------------------- engine
ENGINE_PROMPTS = [[3, 17, 50, 4, 90, 8, 61], [40, 2, 9], list(range(20, 61)), [7]]


def engine_model(name: str, tmp_path):
    """A transformers model and nanoseek's load of it, with weights peaked enough for greedy."""
    ref = hf_model(name, seed=4)
    ref.save_pretrained(tmp_path)
    return ref, nanoseek.load_model(tmp_path).eval()


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("name", ["qwen2_tied_gqa4", "llama_bias_llama3_gqa4"])
def test_engine_greedy_matches_transformers_generate(tmp_path, name, pack, monkeypatch):
    """Also with the weights in oneDNN's layout (engine/packed.py): q/k/v with biases, a tied head kept."""
    from nanoseek.engine import Engine, packed
    from nanoseek.engine.cache import PagedKVCache

    ref, ours = engine_model(name, tmp_path)
    monkeypatch.setattr(packed, "PACK_MIN_ELEMENTS", 0)  # this model's matrices are all small
    # Small blocks and prefill chunks: prompts prefill over several steps while others decode.
    engine = Engine(ours, max_batch_size=4, block_size=4, prefill_chunk=8, pack_weights=pack)
    if pack and packed.packable(ref):
        attn = ours.model.layers[0].self_attn
        assert isinstance(attn.q_proj, packed.PackedLinear)
        assert attn.q_proj.bias is not None  # Qwen2's q/k/v biases; Llama's attention_bias
        assert isinstance(ours.lm_head, packed.PackedLinear) != ours.config.tie_word_embeddings
    assert isinstance(engine.cache, PagedKVCache)
    cfg = ours.config
    assert (
        engine.stats()["cache_bytes_per_token"]
        == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 16 * 4
    )
    got = engine.generate(ENGINE_PROMPTS, max_new_tokens=12, ignore_eos=True)
    for prompt, out in zip(ENGINE_PROMPTS, got, strict=True):
        with torch.no_grad():
            want = ref.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert out == want[0, len(prompt) :].tolist()


def test_engine_logprobs_batching_and_prefix_reuse(tmp_path):
    from nanoseek.engine import Engine, SamplingParams

    _, ours = engine_model("qwen2_untied_gqa2", tmp_path)
    engine = Engine(ours, max_batch_size=4, block_size=4, prefill_chunk=8)
    res = engine.generate_detailed(ENGINE_PROMPTS, max_new_tokens=6, logprobs=3, ignore_eos=True)
    worst = 0.0
    for prompt, c in zip(ENGINE_PROMPTS, res, strict=True):
        with torch.no_grad():
            full = ours(torch.tensor([prompt + c.token_ids[:-1]]))[0].log_softmax(-1)
        for i, lp in enumerate(c.logprobs):
            ref = full[len(prompt) - 1 + i]
            assert lp.token_id == int(ref.argmax())
            worst = max(worst, abs(lp.logprob - float(ref[lp.token_id])))
    assert worst < 1e-4
    # Continuous batching: requests joining mid-way get what they get alone.
    solo = [Engine(ours).generate([p], max_new_tokens=6, ignore_eos=True)[0] for p in ENGINE_PROMPTS]
    engine = Engine(ours, max_batch_size=2, block_size=4, prefill_chunk=5)
    ids, got, steps = [], {}, 0
    while engine.has_unfinished() or len(ids) < len(ENGINE_PROMPTS):
        if len(ids) < len(ENGINE_PROMPTS) and steps % 2 == 0:
            rid = engine.add_request(
                ENGINE_PROMPTS[len(ids)], SamplingParams(max_new_tokens=6, ignore_eos=True)
            )
            ids.append(rid)
            got[rid] = []
        for ev in engine.step():
            got[ev.request_id].extend(ev.new_token_ids)
        steps += 1
    assert [got[r] for r in ids] == solo
    # The prefix cache shares K/V blocks as it shares MLA's latent blocks.
    system = list(range(10, 50))
    prompts = [system + [5, 6], system + [7, 8, 9]]
    fresh = [Engine(ours, block_size=16).generate([p], max_new_tokens=5, ignore_eos=True)[0] for p in prompts]
    engine = Engine(ours, block_size=16)
    again = [engine.generate([p], max_new_tokens=5, ignore_eos=True)[0] for p in prompts]
    assert again == fresh and engine.stats()["prefix_cache_hit_blocks"] == 2


def test_engine_int8_and_no_speculation(tmp_path):
    from nanoseek.engine import Engine

    _, ours = engine_model("qwen2_tied_gqa4", tmp_path)
    with pytest.raises(ValueError, match="not available"):
        Engine(ours, speculative=True)
    # int8 weights (w8a8: and 8-bit activations), the q/k/v biases kept beside them in the model's dtype.
    for fmt in ("int8", "w8a8"):
        q = Engine(nanoseek.load_model(tmp_path).eval(), quantize=fmt)
        layer = q.model.model.layers[0].self_attn
        assert layer.q_proj.qweight.dtype == torch.int8 and layer.q_proj.bias is not None
        assert [len(x) for x in q.generate(ENGINE_PROMPTS[:2], max_new_tokens=4, ignore_eos=True)] == [4, 4]


def test_inspect_r1_distill_qwen_1_5b_shape(tmp_path, capsys):
    """`nanoseek inspect` on DeepSeek-R1-Distill-Qwen-1.5B's config.json (only the config is read)."""
    from nanoseek.cli import main

    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 131072,
        "max_window_layers": 21,
        "rope_theta": 10000,
        "rms_norm_eps": 1e-06,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    h, layers, v, d = 1536, 28, 151936, 128
    per_layer = h * (12 + 2 * 2) * d + (12 + 2 * 2) * d + 12 * d * h + 3 * h * 8960 + 2 * h
    assert out["total_params"] == 2 * v * h + layers * per_layer + h  # ~1.78B, untied
    assert out["attention_variant"] == "gqa"
    assert out["kv_cache_bytes_per_token"] == layers * 2 * 2 * d * 2  # 28 KiB in bf16
    assert out["mla_kv_cache_bytes_per_token"] == layers * (4 * d + d // 2) * 2
    assert out["mha_kv_cache_bytes_per_token"] == layers * 12 * 2 * d * 2
    assert main(["inspect", str(tmp_path)]) == 0
    assert "MLA would need" in capsys.readouterr().out


def test_engine_bf16_logprobs_near_full_recompute(tmp_path):
    """bf16, as `serve` runs on a GPU: each step's log-prob near a full recompute on the same prefix."""
    from nanoseek.engine import Engine

    _, ours = engine_model("llama_bias_llama3_gqa4", tmp_path)
    ours = ours.to(torch.bfloat16)
    res = Engine(ours, block_size=4, prefill_chunk=8).generate_detailed(
        ENGINE_PROMPTS, max_new_tokens=6, logprobs=0, ignore_eos=True
    )
    errors = []
    for prompt, c in zip(ENGINE_PROMPTS, res, strict=True):
        with torch.no_grad():
            full = ours(torch.tensor([prompt + c.token_ids[:-1]]))[0].float().log_softmax(-1)
        errors += [
            abs(lp.logprob - float(full[len(prompt) - 1 + i, lp.token_id])) for i, lp in enumerate(c.logprobs)
        ]
    assert max(errors) < 5e-2, max(errors)


def test_chunked_prefill_through_a_cache_that_returns_no_mask():
    """`LatentCache.update` may return None for plain causal: a later chunk of S queries over T > S
    rows must then see its earlier rows and itself, as one forward over the whole prompt does."""

    class ConcatCache:  # a cache of one's own: every row of a layer, no mask
        def __init__(self) -> None:
            self.rows: dict[int, torch.Tensor] = {}

        def update(self, layer_idx: int, latent: torch.Tensor) -> tuple[torch.Tensor, None]:
            old = self.rows.get(layer_idx)
            self.rows[layer_idx] = latent if old is None else torch.cat((old, latent), dim=1)
            return self.rows[layer_idx], None

    cfg = ModelConfig.from_dict(transformers.Qwen2Config(**hf_kwargs()).to_dict())
    model = build_model(cfg).init_weights(seed=1).eval()
    ids = ids_for(9, batch=1)
    cache = ConcatCache()
    with torch.no_grad():
        model(ids[:, :5], cache=cache)
        chunk = model(ids[:, 5:], positions=torch.arange(5, 9).unsqueeze(0), cache=cache)
        torch.testing.assert_close(chunk, model(ids)[:, 5:])


def test_two_token_forward_is_causal():
    """The shortest prompt SDPA's is_causal must cover: the first token's logits do not depend on the
    second token (a prompt of two was attended both ways)."""
    cfg = ModelConfig.from_dict(transformers.Qwen2Config(**hf_kwargs()).to_dict())
    model = build_model(cfg).init_weights(seed=1).eval()
    ids = ids_for(2, batch=1)
    other = ids.clone()
    other[0, 1] = (ids[0, 1] + 1) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, 0], model(other)[:, 0])
        torch.testing.assert_close(model(ids)[:, :1], model(ids[:, :1]))


@st.composite
def dense_families(draw) -> tuple[str, dict]:
    """A transformers Qwen2Config or LlamaConfig of any small shape: GQA ratios 1-3, Llama's head_dim
    apart from hidden/heads, attention biases, Llama 3 scaling, tied embeddings."""
    family = draw(st.sampled_from(["Qwen2Config", "LlamaConfig"]))
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    kw = dict(
        vocab_size=draw(st.integers(8, 40)),
        hidden_size=heads * draw(st.sampled_from([2, 4, 8])),  # (Qwen2's head: hidden/heads, even)
        intermediate_size=draw(st.integers(1, 24)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        tie_word_embeddings=draw(st.booleans()),
        rope_theta=draw(st.sampled_from([10000.0, 500.0])),
    )
    if family == "LlamaConfig":
        kw["head_dim"] = draw(st.sampled_from([2, 4, 6, 8]))
        kw["attention_bias"] = draw(st.booleans())
        if draw(st.booleans()):
            kw["rope_scaling"] = {
                **LLAMA3,
                "factor": draw(st.sampled_from([2.0, 8.0])),
                "high_freq_factor": draw(st.sampled_from([2.0, 4.0])),
                "original_max_position_embeddings": draw(st.sampled_from([8, 16])),
            }
    return family, kw


@settings(max_examples=6)
@given(dense_families(), st.integers(0, 3))
def test_any_dense_shape_agrees_with_transformers_both_ways_and_in_the_engine(tmp_path_factory, family, seed):
    """transformers' model read by nanoseek, saved by nanoseek and read by transformers: the same logits;
    the config round trips; the engine's greedy tokens are the full forward's argmax, step by step."""
    from nanoseek.engine import Engine

    name, kw = family
    tmp = tmp_path_factory.mktemp("dense")
    ref = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**kw))
    randomize_(ref, seed)
    ref.eval().save_pretrained(tmp / "hf")
    ours = nanoseek.load_model(tmp / "hf").eval()
    assert ModelConfig.from_dict(json.loads(json.dumps(ours.config.to_dict()))) == ours.config
    ids = torch.randint(0, kw["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, rtol=0, atol=TOL)
    save_model(ours, tmp / "ns")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp / "ns").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, want, rtol=0, atol=TOL)
    prompts = [ids[0, :7].tolist(), ids[1, :3].tolist()]
    engine = Engine(ours, max_batch_size=2, block_size=4, prefill_chunk=3)
    assert_greedy(ours, prompts, engine.generate(prompts, max_new_tokens=5, ignore_eos=True))
