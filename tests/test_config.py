import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_configs import mla_configs
from nanoseek.checkpoint import build_model
from nanoseek.config import PRESETS, ModelConfig, get_preset, resolve_config


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip_through_config_json(tmp_path, name):
    cfg = get_preset(name)
    cfg.save(tmp_path)
    again = ModelConfig.load(tmp_path)
    assert again == cfg
    # the class serving stacks (vLLM, SGLang, transformers' pipelines) pick by the file's architectures
    arch = {"deepseek_v3": "DeepseekV3", "deepseek_v2": "DeepseekV2", "qwen2": "Qwen2"}[cfg.model_type]
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [f"{arch}ForCausalLM"]


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("deepseek")])
def test_presets_trained_from_scratch_initialize_at_one_over_sqrt_width(name):
    """N(0, 1/hidden), not transformers' 0.02 (benchmarks/bench_learning.py: a narrow model learns to
    copy much later at 0.02). The golden learning curve builds its own config and cannot see this."""
    cfg = get_preset(name)
    assert cfg.extra.get("initializer_range") == pytest.approx(cfg.hidden_size**-0.5)


def test_preset_names_ignore_case_and_underscores_and_r1_is_v3():
    assert get_preset("Tiny_Qwen2") == get_preset("tiny-qwen2")
    assert get_preset("deepseek_r1") == get_preset("deepseek-v3")
    with pytest.raises(KeyError, match="tiny-dense"):  # the message lists the presets
        get_preset("tiny-moe")


# a small hand-written DeepSeek-V2 config.json: no V3 keys, the routing-group fields left out
V2_FILE = {
    "model_type": "deepseek_v2",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "q_lora_rank": None,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 4,
    "v_head_dim": 8,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 100,
}


def test_reads_deepseek_v2_file_with_defaults(tmp_path):
    d = {**V2_FILE, "n_group": None, "topk_group": None}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = resolve_config(tmp_path)
    assert cfg.scoring_func == "softmax" and cfg.topk_method == "greedy" and cfg.n_group == 1
    assert cfg.norm_topk_prob is False and cfg.routed_scaling_factor == 1.0  # not V3's True, 2.5
    assert cfg.q_lora_rank is None
    # as transformers' DeepseekV2Config (and DeepSeek's own V2 config) default it: V3's 3 made both dense
    assert cfg.first_k_dense_replace == 0 and all(cfg.is_moe_layer(i) for i in range(2))


def test_deepseek_v2_file_without_group_fields_or_rope_layout_reads_v2_defaults():
    """A V2 file that leaves out n_group / topk_group routes over one group (transformers' None), and
    one that names no rope_interleave keeps V2's interleaved RoPE dims (its only layout)."""
    d = dict(V2_FILE)
    cfg = ModelConfig.from_dict(d)
    assert (cfg.n_group, cfg.topk_group) == (1, 1)
    assert cfg.rope_interleave is True


def test_rope_scaling_is_written_with_both_type_keys_and_rope_parameters():
    """config.json names the scaling under `type` (DeepSeek's files) and `rope_type` (transformers'),
    and transformers 5's `rope_parameters` carries the type and rope_theta: a llama3 scaling given by
    `rope_type` alone was written as YaRN before it reached the file."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=dict(llama3),
    )
    d = cfg.to_dict()
    assert d["rope_scaling"]["type"] == d["rope_scaling"]["rope_type"] == "llama3"
    assert d["rope_parameters"]["rope_type"] == "llama3"
    assert d["rope_parameters"]["rope_theta"] == 500000.0
    assert d["rope_parameters"]["factor"] == 8.0
    v3 = get_preset("deepseek-v3").to_dict()["rope_scaling"]  # given by `type` alone
    assert v3["type"] == v3["rope_type"] == "yarn"
    plain = get_preset("tiny").replace(rope_theta=12345.0).to_dict()["rope_parameters"]
    assert plain == {"rope_type": "default", "rope_theta": 12345.0}


def test_rope_parameters_alone_give_rope_theta_and_a_scaling_without_it():
    """A transformers 5 file that has only `rope_parameters`: its rope_theta is the field, not a key
    of rope_scaling (which was then written back into rope_scaling)."""
    d = {**get_preset("tiny").to_dict(), "max_position_embeddings": 4096}
    del d["rope_scaling"], d["rope_theta"]
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    d["rope_parameters"] = {**yarn, "rope_theta": 50000.0}
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}


def test_untyped_rope_scaling_in_a_file_is_plain_rope():
    """transformers reads a rope_scaling that names no type as plain RoPE ("default"): so does
    from_dict (a ModelConfig built with one is refused, naming it)."""
    d = {**get_preset("tiny").to_dict(), "rope_scaling": {"factor": 2.0}}
    del d["rope_parameters"]
    assert ModelConfig.from_dict(d).rope_scaling is None
    with pytest.raises(ValueError, match="names no type"):
        get_preset("tiny").replace(rope_scaling={"factor": 2.0})


def test_saved_config_json_carries_transformers_defaults_of_the_passthrough_fields():
    """Fields nanoseek does not compute with but DeepSeek's config.json carries are written with
    transformers' DeepseekV3Config defaults; a file's stale transformers_version is not written back."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.DeepseekV3Config()
    d = ModelConfig().to_dict()
    for key in ("hidden_act", "initializer_range", "attention_bias", "attention_dropout", "use_cache"):
        assert d[key] == getattr(ref, key), key
    assert d["ep_size"] == 1 and d["moe_layer_freq"] == 1  # DeepSeek's own config.json's values
    read = ModelConfig.from_dict({**d, "transformers_version": "4.0.0"})
    assert "transformers_version" not in read.to_dict()


def test_full_attention_layer_types_are_not_kept():
    """transformers 5 writes Qwen2's layer_types (all "full_attention"): derived, not kept, so a
    replace() of the depth does not write a list of the old length."""
    d = {**get_preset("tiny-qwen2").to_dict(), "layer_types": ["full_attention"] * 3}
    cfg = ModelConfig.from_dict(d).replace(num_hidden_layers=2)
    assert "layer_types" not in cfg.to_dict()


def test_dense_file_without_token_ids_has_none():
    """A Qwen2 / Llama config.json that names no bos/eos/pad id: None, not DeepSeek's 0 and 1."""
    d = get_preset("tiny-qwen2").to_dict()
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        del d[k]
    cfg = ModelConfig.from_dict(d)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (None, None, None)


def test_a_file_naming_only_its_model_type_loads_that_family_defaults(tmp_path):
    """`{"model_type": "deepseek_v3"}` is a config.json (transformers reads it with its defaults), not
    a generation or tokenizer config."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    assert ModelConfig.load(tmp_path) == ModelConfig()


def test_rope_parameters_and_rope_scaling_are_both_read():
    base = get_preset("deepseek-v3").to_dict()
    assert base["rope_scaling"]["type"] == "yarn"
    assert base["rope_parameters"]["rope_type"] == "yarn" and base["rope_parameters"]["factor"] == 40
    only_new = {k: v for k, v in base.items() if k != "rope_scaling"}
    cfg = ModelConfig.from_dict(only_new)
    assert cfg.rope_scaling["factor"] == 40 and cfg.rope_scaling["mscale_all_dim"] == 1.0


@pytest.mark.parametrize("scaling", [{"type": "yarn", "factor": 4.0}, {"rope_type": "llama3", "factor": 8.0}])
def test_rope_scaling_without_original_context_defaults_to_max_position_embeddings(scaling):
    """As transformers reads such a file (standardize_rope_params); a KeyError at model build before."""
    import torch

    from nanoseek.model.attention import rope_inverse_frequencies

    d = {**get_preset("tiny").to_dict(), "max_position_embeddings": 128, "rope_scaling": scaling}
    d.pop("rope_parameters")
    cfg = ModelConfig.from_dict(d)
    explicit = ModelConfig.from_dict(
        {**d, "rope_scaling": {**scaling, "original_max_position_embeddings": 128}}
    )
    inv_freq, factor = rope_inverse_frequencies(cfg)
    want_freq, want_factor = rope_inverse_frequencies(explicit)
    assert torch.equal(inv_freq, want_freq) and factor == want_factor
    assert cfg == explicit  # and saved with it, as transformers writes rope_parameters


@pytest.mark.parametrize(
    "scaling, message",
    [
        ({"type": "linear", "factor": 4.0}, "unsupported rope scaling type 'linear'"),  # a KeyError at build
        # built as YaRN without a word, and saved as "dynamic": a config.json nanoseek refused to load
        ({"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 64}, "'dynamic'"),
        ({"type": "longrope", "factor": 4.0, "original_max_position_embeddings": 64}, "'longrope'"),
        # built as YaRN and saved as "yarn" (in a config.json, untyped is plain RoPE, as transformers reads it)
        ({"factor": 4.0, "original_max_position_embeddings": 64}, "names no type"),
    ],
)
def test_rope_scaling_nanoseek_does_not_implement_is_refused(tmp_path, scaling, message):
    tiny = get_preset("tiny")
    with pytest.raises(ValueError, match=message):
        tiny.replace(rope_scaling=scaling)
    if "type" in scaling or "rope_type" in scaling:  # and from a config.json, naming it
        (tmp_path / "config.json").write_text(json.dumps({**tiny.to_dict(), "rope_scaling": scaling}))
        with pytest.raises(ValueError, match=f"config.json: .*{message}"):
            resolve_config(tmp_path)


def test_empty_rope_scaling_is_plain_rope_and_saved_as_such():
    """As transformers reads {} (and "default"); saved, {} was a YaRN without a factor, which
    transformers refused to load."""
    d = {**get_preset("tiny").to_dict(), "rope_scaling": {}}
    d.pop("rope_parameters")
    for cfg in (ModelConfig.from_dict(d), get_preset("tiny").replace(rope_scaling={})):
        assert cfg.rope_scaling is None
        assert cfg.to_dict()["rope_parameters"]["rope_type"] == "default"
    assert get_preset("tiny").replace(rope_scaling={"type": "default"}).rope_scaling is None


def test_dtype_as_transformers_5_writes_it_is_read():
    """transformers 5 saves `dtype` where 4 saved `torch_dtype`."""
    d = {k: v for k, v in get_preset("tiny").to_dict().items() if k != "torch_dtype"}
    assert ModelConfig.from_dict({**d, "dtype": "float16"}).torch_dtype == "float16"


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        get_preset("tiny").replace(num_experts_per_tok=99)
    with pytest.raises(ValueError, match="scoring_func"):
        get_preset("tiny").replace(scoring_func="relu")
    with pytest.raises(ValueError, match="neither a directory"):
        resolve_config("no-such-preset")


def test_a_directory_of_a_presets_name_without_config_json_is_the_preset(tmp_path, monkeypatch):
    """A run directory named after its preset (`pretrain --out tiny`) is no model directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert resolve_config("tiny") == get_preset("tiny")
    get_preset("small").save(tmp_path / "tiny")  # one with a config.json is read
    assert resolve_config("tiny") == get_preset("small")
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_config("mine")


def test_v3_groups_of_one_expert_are_refused():
    """noaux_tc ranks a group by its top-2 scores (DeepSeek's Gate, transformers' router): a group of
    one expert has none, and the router failed at the first forward; V2's group max takes it."""
    tiny = get_preset("tiny")
    with pytest.raises(ValueError, match="at least 2"):
        tiny.replace(n_group=16, topk_group=8)
    tiny.replace(n_group=16, topk_group=8, scoring_func="softmax", topk_method="group_limited_greedy")
    tiny.replace(n_group=8, topk_group=4)
    # the limits themselves are allowed: every expert routed, and groups that hold exactly k experts
    tiny.replace(num_experts_per_tok=16, n_group=1, topk_group=1)
    tiny.replace(num_experts_per_tok=4, n_group=4, topk_group=1)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"kv_lora_rank": 0}, "kv_lora_rank"),  # a ZeroDivisionError building the model before
        ({"q_lora_rank": 0}, "q_lora_rank"),  # DeepSeek's inference code's "full rank": null here
        ({"vocab_size": 0}, "vocab_size"),  # crashed in the first forward
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
        ({"intermediate_size": 0}, "intermediate_size"),  # a dense layer that outputs zeros
        ({"v_head_dim": 0}, "v_head_dim"),  # attention that outputs zeros
        ({"max_position_embeddings": 0}, "max_position_embeddings"),
        ({"n_group": 0}, "n_group"),  # an unnamed ZeroDivisionError
        ({"hidden_size": 256.0}, "hidden_size"),  # crashed building the model; transformers refuses it
        ({"num_attention_heads": "4"}, "num_attention_heads"),  # an unnamed TypeError
        ({"rope_theta": 0}, "rope_theta"),  # NaN rotations
        ({"rope_scaling": {"type": "llama3", "low_freq_factor": 1.0}}, "factor"),  # KeyError in build
        ({"hidden_size": True}, "hidden_size"),  # JSON's true is no integer (Python's bool is)
        ({"qk_nope_head_dim": -8}, "qk_nope_head_dim"),
        ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),  # RoPE rotates pairs of dims
        # heads of size 0: a ZeroDivisionError (the softmax scale) building the model
        ({"qk_nope_head_dim": 0, "qk_rope_head_dim": 0}, "qk_nope_head_dim \\+ qk_rope_head_dim"),
        ({"n_shared_experts": -1}, "n_shared_experts"),  # a negative dimension building the model
        ({"n_group": 3}, "divisible by n_group"),  # 16 experts in 3 groups
        ({"topk_group": 0}, "topk_group \\(0\\) must be in 1..n_group"),  # no group, no expert
        ({"topk_group": 5}, "topk_group \\(5\\) must be in 1..n_group"),  # more groups than the 4 there are
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),  # routed experts, none a token
        ({"qk_nope_head_dim": -1}, "qk_nope_head_dim"),  # -1 + 16 > 0: the sum alone does not catch it
        ({"rms_norm_eps": None}, "rms_norm_eps"),  # a non-optional field left null
        ({"rope_theta": True}, "rope_theta"),  # JSON's true is no number either
        ({"tie_word_embeddings": 1}, "tie_word_embeddings"),  # 1 is no JSON boolean
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
        ({"rope_theta": "10000"}, "rope_theta"),  # an unnamed TypeError
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),  # loaded, then crashed in the first forward
        ({"routed_scaling_factor": "2.5"}, "routed_scaling_factor"),  # the same
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),  # loaded as tied: "false" is truthy
        ({"rope_scaling": "yarn"}, "rope_scaling"),  # an unnamed error from dict()
        ({"rope_scaling": {"type": "yarn", "factor": "4"}}, "factor"),  # crashed building the model
        # unnamed TypeErrors (a ValueError "math domain error" for the 0) building the model
        ({"rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": "32"}}, "beta_fast"),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0, "mscale_all_dim": "1.0"}}, "mscale_all_dim"),
        (
            {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}},
            "original_max",
        ),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": None}},
            "original",
        ),
        ({"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": "1"}}, "low_freq_factor"),
        ({"moe_layer_freq": 0}, "moe_layer_freq"),  # built with every layer MoE, as if it were 1
        ({"moe_layer_freq": 1.5}, "moe_layer_freq"),  # taken as 1
        ({"rope_parameters": "yarn"}, "rope_parameters"),  # an AttributeError naming no file
    ],
)
def test_hand_edited_config_json_is_refused_at_load_naming_the_field(tmp_path, change, field):
    (tmp_path / "config.json").write_text(json.dumps({**get_preset("tiny").to_dict(), **change}))
    with pytest.raises(ValueError, match=field):
        resolve_config(tmp_path)
    # and what the field allows still loads: 0 MoE layers need no intermediate size of their own
    dense = get_preset("tiny-dense")
    assert dense.replace(moe_intermediate_size=0).moe_intermediate_size == 0


def test_yarn_factor_left_null_is_the_context_ratio():
    """As transformers computes it (max_position_embeddings / original); softmax_scale's mscale
    raised a TypeError (a KeyError with the key left out) at the model's build before."""
    from nanoseek.checkpoint import build_model

    yarn = {"type": "yarn", "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 1.0}
    d = {**get_preset("tiny").to_dict(), "max_position_embeddings": 1024}
    d.pop("rope_parameters")
    explicit = ModelConfig.from_dict({**d, "rope_scaling": {**yarn, "factor": 4.0}})
    for scaling in ({**yarn, "factor": None}, yarn):
        cfg = ModelConfig.from_dict({**d, "rope_scaling": scaling})
        assert cfg == explicit and cfg.softmax_scale == explicit.softmax_scale
        build_model(cfg, device="meta")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"[1, 2]", "is not a JSON object: it holds an array"),  # was: cannot convert dictionary update ...
        (b'"deepseek_v3"', "is not a JSON object: it holds a string"),
        (b"null", "is not a JSON object: it holds null"),  # was: 'NoneType' object is not iterable
        (b'{"hidden_size": 64, "model_type": "deepseek\xff_v3"}', "is not valid JSON: 'utf-8' codec"),
    ],
)
def test_a_config_json_that_is_no_json_object_is_named(tmp_path, text, message):
    """A hand edit or a broken copy: config.json of another JSON type, or not UTF-8 (whose error named
    no file)."""
    (tmp_path / "config.json").write_bytes(text)
    with pytest.raises(ValueError, match=rf"{tmp_path}/config\.json {message}"):
        resolve_config(tmp_path)


def test_a_type_error_reading_a_config_json_names_the_file(tmp_path):
    """A hand edit that fails with a TypeError deep in from_dict (a layer_types that is no list) is
    reported as a ValueError naming the file, as the other hand edits are."""
    d = {**get_preset("tiny-qwen2").to_dict(), "layer_types": 5}
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="config.json: .*not iterable"):
        ModelConfig.load(tmp_path)


@settings(max_examples=60)
@given(mla_configs())
def test_any_config_round_trips_through_config_json_and_transformers_config_classes(cfg):
    """Read back, a saved config.json is the config it was saved from; so is the file transformers'
    DeepseekV3Config / DeepseekV2Config writes from it (which adds its own keys, kept in `extra`, and
    head_dim, its copy of qk_rope_head_dim, which MLA does not read). A config without routed experts
    is saved with every layer dense (`to_dict`), the same model: compared as its file says."""
    transformers = pytest.importorskip("transformers")
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.to_dict() == cfg.to_dict()
    assert ModelConfig.from_dict(back.to_dict()) == back
    if cfg.is_moe:
        assert back.replace(extra=cfg.extra) == cfg
    cls = transformers.DeepseekV3Config if cfg.model_type == "deepseek_v3" else transformers.DeepseekV2Config
    theirs = ModelConfig.from_dict(json.loads(cls(**cfg.to_dict()).to_json_string()))
    assert cfg.to_dict().items() <= theirs.to_dict().items()


@st.composite
def config_dicts(draw) -> dict:
    """A small valid config.json with some fields changed to any value near their range (zero,
    negative, null, more experts per token than there are, more groups than experts, ...)."""
    d = {
        "model_type": draw(st.sampled_from(["deepseek_v3", "deepseek_v2"])),
        "vocab_size": 16,
        "hidden_size": 8,
        "intermediate_size": 4,
        "moe_intermediate_size": 4,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "q_lora_rank": 4,
        "kv_lora_rank": 4,
        "qk_nope_head_dim": 2,
        "qk_rope_head_dim": 2,
        "v_head_dim": 2,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 0,
        "num_nextn_predict_layers": 0,
        "max_position_embeddings": 16,
        "torch_dtype": "float32",
    }
    small, maybe = st.integers(-1, 6), st.none() | st.integers(-1, 6)
    values = {
        "vocab_size": small,
        "hidden_size": small,
        "intermediate_size": small,
        "moe_intermediate_size": small,
        "num_hidden_layers": st.integers(-1, 3),
        "num_attention_heads": st.integers(-1, 3),
        "q_lora_rank": maybe,
        "kv_lora_rank": small,
        "qk_nope_head_dim": small,
        "qk_rope_head_dim": small,
        "v_head_dim": small,
        "n_routed_experts": maybe,
        "n_shared_experts": maybe,
        "num_experts_per_tok": maybe,
        "n_group": maybe,
        "topk_group": maybe,
        "first_k_dense_replace": st.integers(-1, 3),
        "num_nextn_predict_layers": st.integers(-1, 2),
        "moe_layer_freq": st.integers(-1, 2),
        "scoring_func": st.sampled_from(["sigmoid", "softmax"]),
        "topk_method": st.sampled_from(["noaux_tc", "greedy", "group_limited_greedy"]),
        "max_position_embeddings": st.integers(-1, 8),
    }
    for key in draw(st.sets(st.sampled_from(sorted(values)), max_size=4)):
        d[key] = draw(values[key])
    return d


@settings(max_examples=200)
@given(config_dicts())
def test_a_config_json_is_refused_naming_the_problem_or_its_model_runs(d):
    """No config.json is read that the model then fails on (an IndexError in the router, a shape error
    in attention): a ValueError at load, or a model whose forwards run (naive, absorbed, MTP)."""
    try:
        cfg = ModelConfig.from_dict(d)
    except ValueError:
        return
    model = build_model(cfg).init_weights(seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad():
        h = model(ids, return_hidden=True)[1]
        model(ids, absorb=True)
        if cfg.num_nextn_predict_layers:
            model.mtp_logits(h, ids)
