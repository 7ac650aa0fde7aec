"""nanoseek <-> transformers: same weights, same logits (fp32, 1e-4), in both directions.

Random-weight transformers models are built from `ModelConfig.to_dict()`, saved with
`save_pretrained`, loaded with `nanoseek.load_model`, and compared on the same ids; then nanoseek
models are saved with `save_model` and read back by `AutoModelForCausalLM.from_pretrained`.

DeepSeek-V2 semantics (model_type deepseek_v2, softmax scores):
- transformers' `DeepseekV2TopkRouter` ignores `norm_topk_prob` and always multiplies by
  `routed_scaling_factor`. DeepSeek's own V2 gate normalizes the top-k weights *instead of* scaling them
  when `norm_topk_prob` is set (`if top_k > 1 and norm_topk_prob: w /= sum; else: w *= scale`).
  nanoseek follows DeepSeek. The published V2 / V2-Lite configs have `norm_topk_prob: false`, where all
  three agree; `test_v2_norm_topk_prob_differs_from_transformers` pins the documented difference.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nanoseek
from nanoseek.checkpoint import build_model, read_safetensors, save_model, transformers_differences
from nanoseek.config import ModelConfig

transformers = pytest.importorskip("transformers")

from model_configs import mla_configs  # noqa: E402
from model_configs import small_config as shared_small_config  # noqa: E402

VOCAB = 96
TOL = 1e-4


def small_config(**changes) -> ModelConfig:
    return shared_small_config(**{"vocab_size": VOCAB, **changes})


V3_CONFIGS = {
    "qlora_groups_dense_first": small_config(),
    "no_qlora_one_group_all_moe": small_config(
        q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0
    ),
    "yarn": small_config(
        max_position_embeddings=256,
        rope_scaling={
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        },
    ),
    "no_interleave_two_shared": small_config(
        rope_interleave=False, n_shared_experts=2, num_experts_per_tok=3
    ),
    # YaRN as a config.json may write it, beta_fast/beta_slow and mscale left to their defaults, with a
    # ramp that falls between dims (from 1 to 5 of 8): the correction range, its truncation and the
    # default attention factor are in the comparison (the "yarn" entry's ramp is a step at dim 0).
    "yarn_defaults_ramp_between_dims": small_config(
        qk_rope_head_dim=16,
        max_position_embeddings=4096,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    ),
    # One expert per token: its normalized weight is 1, then scaled (transformers, DeepSeek's inference).
    "top1_normalized": small_config(num_experts_per_tok=1, n_group=1, topk_group=1),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits are O(1) (default inits make them ~0 and the test blind)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.numel():  # transformers' shared expert of width 0 (n_shared_experts 0)
            continue
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        else:
            p.copy_(noise * (0.6 / p.shape[-1] ** 0.5))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            # A bias large enough to change choices; sigmoid + bias stays positive.
            b.copy_(torch.rand(b.shape, generator=gen) * 0.2)


def hf_model(cfg: ModelConfig, seed: int = 0):
    d = cfg.to_dict()
    if cfg.model_type == "deepseek_v2":
        hc = transformers.DeepseekV2Config(**d)
        model = transformers.DeepseekV2ForCausalLM(hc)
    else:
        hc = transformers.DeepseekV3Config(**d)
        model = transformers.DeepseekV3ForCausalLM(hc)
    randomize_(model, seed)
    return model.eval()


def ids_for(seq: int = 24, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert a.abs().max() > 0.3, "logits too small for the comparison to mean anything"
    err = (a - b).abs().max().item()
    assert err < TOL, f"max |diff| {err:.2e} >= {TOL}"


@pytest.mark.parametrize("name", sorted(V3_CONFIGS))
def test_transformers_v3_to_nanoseek(tmp_path, name):
    cfg = V3_CONFIGS[name]
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path).eval()
    # The selection-only bias survived the trip (it changes routing, so the logits test covers it too).
    biases = [r.e_score_correction_bias for _, r in ours.routers()]
    assert biases and all(b.abs().sum() > 0 for b in biases)
    seq = 40 if cfg.rope_scaling else 24  # past original_max_position_embeddings for YaRN
    ids = ids_for(seq)
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits)


def test_rms_norm_in_bf16_rounds_as_transformers():
    """The norm runs in fp32, is cast back to bf16, then scaled by the bf16 weight (one rounding
    more than scaling in fp32): transformers' and DeepSeek's order, bit for bit."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    from nanoseek.model.attention import RMSNorm

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 64, generator=gen).to(torch.bfloat16)
    ours, ref = RMSNorm(64).to(torch.bfloat16), DeepseekV3RMSNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.5 * torch.randn(64, generator=gen))
        ref.weight.copy_(ours.weight)
        assert torch.equal(ours(x), ref(x))


def test_bias_changes_routing_in_the_comparison(tmp_path):
    """Guard against a test that would pass with the bias ignored: zeroing it changes the logits."""
    cfg = V3_CONFIGS["qlora_groups_dense_first"]
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path).eval()
    ids = ids_for()
    with torch.no_grad():
        before = ours(ids)
        for _, r in ours.routers():
            r.e_score_correction_bias.zero_()
        assert (ours(ids) - before).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["qlora_groups_dense_first", "no_interleave_two_shared"])
def test_nanoseek_to_transformers_with_mtp(tmp_path, name):
    cfg = V3_CONFIGS[name].replace(num_nextn_predict_layers=1)
    ours = build_model(cfg).init_weights(seed=2).eval()
    randomize_(ours, seed=3)
    save_model(ours, tmp_path / "ckpt")
    keys = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert keys["num_nextn_predict_layers"] == 1
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(ref).__name__ == "DeepseekV3ForCausalLM"
    ids = ids_for()
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits)
    # And nanoseek reads its own file back, MTP layer included.
    again = nanoseek.load_model(tmp_path / "ckpt").eval()
    with torch.no_grad():
        h = ours(ids, return_hidden=True)[1]
        torch.testing.assert_close(again.mtp_logits(h, ids)[0], ours.mtp_logits(h, ids)[0], rtol=0, atol=0)


def test_a_model_without_routed_experts_is_dense_for_transformers_too(tmp_path):
    """n_routed_experts 0 makes every nanoseek layer dense, whatever first_k_dense_replace says; transformers
    (as vLLM and DeepSeek's code) made the layers past it MoE layers of 0 experts, whose forward failed.
    The file says every layer, the MTP one's too, is a leading dense one: the same logits, read back alike."""
    cfg = small_config(
        n_routed_experts=0, num_experts_per_tok=0, n_shared_experts=0, num_nextn_predict_layers=1
    )
    assert cfg.first_k_dense_replace < cfg.num_hidden_layers
    ours = build_model(cfg).init_weights(seed=2).eval()
    randomize_(ours, seed=3)
    save_model(ours, tmp_path / "ckpt")
    keys = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert keys["first_k_dense_replace"] == cfg.num_hidden_layers + 1
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = ids_for()
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits)
    again = nanoseek.load_model(tmp_path / "ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change",
    [
        {"qk_rope_head_dim": 4},
        {"qk_nope_head_dim": 24},
        # transformers groups query heads by num_key_value_heads, which the file held at the old 4
        {"num_attention_heads": 8},
    ],
)
def test_head_sizes_changed_on_a_transformers_config_are_what_transformers_reads(tmp_path, change):
    """transformers writes head_dim (its copy of qk_rope_head_dim), qk_head_dim (their sum) and
    num_key_value_heads (the head count, for MLA) into config.json; kept from such a file (or, for the
    last, from the config a replace() started from), they went stale when a head size or count changed,
    and transformers took the stale values (a shape error in its forward)."""
    hf_model(small_config()).save_pretrained(tmp_path / "hf")
    cfg = ModelConfig.load(tmp_path / "hf").replace(**change)
    ours = build_model(cfg).init_weights(seed=2).eval()
    randomize_(ours, seed=3)
    save_model(ours, tmp_path / "ckpt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert (ref.config.head_dim, ref.config.qk_head_dim) == (cfg.qk_rope_head_dim, cfg.qk_head_dim)
    ids = ids_for()
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits)


def test_sharded_save_and_load(tmp_path):
    cfg = V3_CONFIGS["qlora_groups_dense_first"].replace(num_nextn_predict_layers=1)
    ours = build_model(cfg).init_weights(seed=2).eval()
    randomize_(ours, seed=5)
    save_model(ours, tmp_path / "ckpt", max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / "ckpt" / s).exists() for s in shards)
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    ids = ids_for()
    again = nanoseek.load_model(tmp_path / "ckpt").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(again(ids), expected, rtol=0, atol=0)
        assert_close(ref(ids).logits, expected)
    # Saving again unsharded removes the stale shards and index.
    save_model(again, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").exists()
    assert not (tmp_path / "ckpt" / "model.safetensors.index.json").exists()
    assert not list((tmp_path / "ckpt").glob("model-*.safetensors"))


# ---------------------------------------------------------------- DeepSeek-V2
def v2_config(**changes) -> ModelConfig:
    base = dict(
        model_type="deepseek_v2", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.5
    )
    return small_config(**{**base, **changes})


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_transformers_checkpoint_without_shared_experts_loads(tmp_path, model_type):
    """transformers builds a shared expert of width 0 where n_shared_experts is 0 and saves its empty
    weights: they hold nothing, so nanoseek (no shared expert module) loads the file, streamed or in
    memory, with the same logits; non-empty ones are still refused."""
    from safetensors.torch import load_file, save_file

    from nanoseek.checkpoint import check_keys, from_hf_state_dict, read_safetensors

    cfg = small_config(n_shared_experts=0)
    if model_type == "deepseek_v2":
        cfg = v2_config(n_shared_experts=0, topk_method="greedy", n_group=1, topk_group=1)
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    empty = [k for k, v in state.items() if ".shared_experts." in k]
    assert empty and all(not state[k].numel() for k in empty)
    ours = nanoseek.load_model(tmp_path).eval()
    assert all(layer.mlp.shared_experts is None for layer in ours.model.layers[cfg.first_k_dense_replace :])
    ids = ids_for()
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits)
    check_keys(ours, from_hf_state_dict(read_safetensors(tmp_path), ours.config, torch.float32), tmp_path)
    state[empty[0]] = torch.ones(4, cfg.hidden_size)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected.*shared_experts"):
        nanoseek.load_model(tmp_path)


@pytest.mark.parametrize("topk_method,n_group,topk_group", [("greedy", 1, 1), ("group_limited_greedy", 4, 2)])
def test_transformers_v2_to_nanoseek_and_back(tmp_path, topk_method, n_group, topk_group):
    cfg = v2_config(topk_method=topk_method, n_group=n_group, topk_group=topk_group)
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path / "hf")
    ours = nanoseek.load_model(tmp_path / "hf").eval()
    assert ours.config.model_type == "deepseek_v2" and ours.config.topk_method == topk_method
    ids = ids_for()
    with torch.no_grad():
        assert_close(ours(ids), ref(ids).logits)
    save_model(ours, tmp_path / "ns")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ns").eval()
    assert type(back).__name__ == "DeepseekV2ForCausalLM"
    with torch.no_grad():
        assert_close(back(ids).logits, ref(ids).logits)


def test_v2_norm_topk_prob_differs_from_transformers(tmp_path):
    """DeepSeek's V2 gate: normalized weights are *not* scaled; transformers ignores norm_topk_prob."""
    cfg = v2_config(topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=True)
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.load_model(tmp_path).eval()
    x = torch.randn(5, cfg.hidden_size)
    layer = cfg.first_k_dense_replace
    ours_gate = ours.model.layers[layer].mlp.gate
    _, ref_w, ref_idx = ref.model.layers[layer].mlp.gate(x)
    idx, w = ours_gate(x)
    torch.testing.assert_close(idx.sort(-1).values, ref_idx.sort(-1).values)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))  # DeepSeek: normalized, no scaling
    assert (ref_w.sum(-1) < 1.0 * cfg.routed_scaling_factor).all()  # transformers: scaled softmax mass


IGNORED_BY_TRANSFORMERS = {
    "scoring_func": small_config(scoring_func="softmax"),
    "topk_method": small_config(topk_method="greedy", n_group=1, topk_group=1),
    "moe_layer_freq": small_config(first_k_dense_replace=0, num_hidden_layers=3, extra={"moe_layer_freq": 2}),
    "rope_interleave": v2_config(topk_method="greedy", n_group=1, topk_group=1, rope_interleave=False),
    "norm_topk_prob": v2_config(topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=True),
}


@pytest.mark.parametrize("field", sorted(IGNORED_BY_TRANSFORMERS))
def test_saving_what_transformers_computes_otherwise_warns_naming_it(tmp_path, field):
    """transformers loads these files without a word and computes other logits: the save says so."""
    ours = build_model(IGNORED_BY_TRANSFORMERS[field]).init_weights(seed=2).eval()
    randomize_(ours, seed=3)
    with pytest.warns(UserWarning, match=field):
        save_model(ours, tmp_path / "ck")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    ids = ids_for()
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() > 1e-2  # the warning is true
    torch.testing.assert_close(nanoseek.load_model(tmp_path / "ck").eval()(ids), ours(ids))


def test_saving_a_v2_router_transformers_cannot_run_warns_naming_it(tmp_path):
    """V3's noaux_tc routing in a deepseek_v2 file (model_type changed on a V3 config, whose routing
    stays): transformers' DeepseekV2 (as DeepSeek's V2 code) routes greedy or group_limited_greedy only,
    and failed at its first forward on a file saved without a word."""
    ours = build_model(v2_config(n_group=1, topk_group=1)).init_weights(seed=2).eval()
    assert ours.config.topk_method == "noaux_tc"
    with pytest.warns(UserWarning, match="topk_method='noaux_tc'"):
        save_model(ours, tmp_path / "ck")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    with pytest.raises(UnboundLocalError), torch.no_grad():  # the warning is true: no weights routed
        ref(ids_for())
    torch.testing.assert_close(nanoseek.load_model(tmp_path / "ck").eval()(ids_for()), ours(ids_for()))


def test_saving_a_v2_width_transformers_refuses_warns_naming_it(tmp_path):
    """MLA's heads need not divide hidden_size (nanoseek and transformers' DeepseekV3 run such a model);
    transformers' DeepseekV2Config refuses the file, which the save said nothing of."""
    ours = build_model(v2_config(topk_method="greedy", n_group=1, topk_group=1, hidden_size=66))
    with pytest.warns(UserWarning, match="hidden_size=66 not a multiple of num_attention_heads=4"):
        save_model(ours, tmp_path / "ck")
    with pytest.raises(
        Exception, match="not a multiple of the number of attention heads"
    ):  # the warning is true
        transformers.AutoConfig.from_pretrained(tmp_path / "ck")


def test_a_transformers_v2_checkpoint_with_mlp_bias_is_refused_naming_it(tmp_path):
    """transformers' DeepseekV2 gives the dense MLPs and shared experts biases with `mlp_bias`; nanoseek's
    MLPs have none, and such a checkpoint was refused as "written for another config.json"."""
    hc = transformers.DeepseekV2Config(
        **{**v2_config(topk_method="greedy", n_group=1, topk_group=1).to_dict(), "mlp_bias": True}
    )
    transformers.DeepseekV2ForCausalLM(hc).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mlp_bias"):
        nanoseek.load_model(tmp_path)
    with pytest.raises(ValueError, match="mlp_bias"):  # nor built, then saved as a file with biases
        small_config(extra={"mlp_bias": True})


def test_saving_what_transformers_computes_alike_does_not_warn(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_model(build_model(V3_CONFIGS["no_interleave_two_shared"]).init_weights(seed=2), tmp_path / "a")
        save_model(build_model(v2_config(topk_method="greedy", n_group=1, topk_group=1)), tmp_path / "b")


def test_transformers_checkpoint_without_mtp_weights_loads(tmp_path):
    """transformers' DeepseekV3Config keeps its default num_nextn_predict_layers (1), and its
    save_pretrained writes no MTP weights: nanoseek loads the main model whole, without MTP, says so,
    and writes back a config that matches its weights. A checkpoint missing main weights is refused."""
    import warnings

    # the shared small shape, with every MTP field left to transformers' own default
    fields = {k: v for k, v in small_config().to_dict().items() if k != "num_nextn_predict_layers"}
    hc = transformers.DeepseekV3Config(**fields)
    assert hc.num_nextn_predict_layers == 1  # transformers' own default
    torch.manual_seed(0)
    theirs = transformers.DeepseekV3ForCausalLM(hc).eval()
    theirs.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = nanoseek.load_model(tmp_path / "hf").eval()
    assert any("no MTP weights" in str(w.message) for w in caught)
    assert ours.config.num_nextn_predict_layers == 0 and len(ours.model.mtp_layers) == 0
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=TOL)
    save_model(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    nanoseek.load_model(tmp_path / "ours")
    # really broken: a main-model weight missing is refused, naming it and why it matters
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "ours" / "model.safetensors")
    del state["model.layers.1.self_attn.o_proj.weight"]
    save_file(state, tmp_path / "ours" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"o_proj.*uninitialised memory"):
        nanoseek.load_model(tmp_path / "ours")


@pytest.mark.parametrize("mtp", [0, 1])
def test_tied_embeddings_stay_tied_through_training_save_and_load(tmp_path, mtp):
    from nanoseek.train.loop import OptimConfig, Trainer, language_model_loss

    cfg = small_config(tie_word_embeddings=True, num_nextn_predict_layers=mtp)
    model = build_model(cfg).init_weights(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trainer = Trainer(model, tmp_path / "run", "pretrain", OptimConfig(lr=1e-2), 3, precision="fp32")
    ids = torch.randint(0, VOCAB, (2, 12))
    for _ in range(3):
        trainer.step(lambda: language_model_loss(trainer.model, ids[:, :-1], ids[:, 1:], mtp_weight=0.3))
        assert model.lm_head.weight is model.model.embed_tokens.weight
    save_model(model, tmp_path / "ck")
    assert "lm_head.weight" not in read_safetensors(tmp_path / "ck")  # as save_pretrained: tied, not saved
    loaded = nanoseek.load_model(tmp_path / "ck")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(ids), theirs(ids).logits, atol=TOL)


# ------------------------------------------------------------------ any config
def transformers_runs(cfg: ModelConfig) -> bool:
    """Whether transformers' DeepseekV2/V3 compute this config as DeepSeek does (what `save_model`
    warns about aside) and run it at all: its V3 router ranks groups by their top-2 scores even where
    there is one group of one expert, and its V2 RoPE views the rotated dims as complex numbers, which
    needs even strides (an odd qk_nope_head_dim or kv_lora_rank fails there)."""
    if transformers_differences(cfg):
        return False
    if cfg.model_type == "deepseek_v3":
        return not cfg.is_moe or cfg.n_routed_experts // cfg.n_group >= 2
    return cfg.qk_nope_head_dim % 2 == 0 and cfg.kv_lora_rank % 2 == 0


@settings(max_examples=8)
@given(mla_configs().filter(transformers_runs), st.integers(0, 3))
def test_transformers_and_nanoseek_logits_agree_for_any_config(tmp_path_factory, cfg, seed):
    """Both ways: transformers' random model saved by save_pretrained and read by nanoseek, and
    nanoseek's saved by save_model and read by transformers (its eager expert loop, whose grouped_mm
    kernel refuses odd widths), give the same logits; nanoseek reads its own file back exactly."""
    tmp = tmp_path_factory.mktemp("ckpt")
    cls = "DeepseekV3" if cfg.model_type == "deepseek_v3" else "DeepseekV2"
    hc = getattr(transformers, f"{cls}Config")(**cfg.to_dict())
    hc._experts_implementation = "eager"
    ref = getattr(transformers, f"{cls}ForCausalLM")(hc)
    randomize_(ref, seed)
    ref.eval().save_pretrained(tmp / "hf")
    with (
        warnings.catch_warnings()
    ):  # (its file asks for MTP layers it holds no weights of: said, tested above)
        warnings.filterwarnings("ignore", ".*config.json asks for", UserWarning)
        ours = nanoseek.load_model(tmp / "hf").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = ref(ids).logits
        torch.testing.assert_close(ours(ids), want, rtol=0, atol=TOL)
    ours = build_model(cfg).init_weights(seed=seed).eval()
    randomize_(ours, seed)
    save_model(ours, tmp / "ns")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp / "ns", experts_implementation="eager")
    again = nanoseek.load_model(tmp / "ns").eval()
    with torch.no_grad():
        want = ours(ids)
        torch.testing.assert_close(theirs.eval()(ids).logits, want, rtol=0, atol=TOL)
        torch.testing.assert_close(again(ids), want, rtol=0, atol=0)
