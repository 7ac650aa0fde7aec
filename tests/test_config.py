import json

import pytest

from nanoseek.config import PRESETS, ModelConfig, get_preset, resolve_config


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip_through_config_json(tmp_path, name):
    cfg = get_preset(name)
    cfg.save(tmp_path)
    again = ModelConfig.load(tmp_path)
    assert again == cfg


def test_reads_deepseek_v2_file_with_defaults(tmp_path):
    d = {
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
        "n_group": None,
        "topk_group": None,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = resolve_config(tmp_path)
    assert cfg.scoring_func == "softmax" and cfg.topk_method == "greedy" and cfg.n_group == 1
    assert cfg.q_lora_rank is None


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


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        get_preset("tiny").replace(num_experts_per_tok=99)
    with pytest.raises(ValueError, match="scoring_func"):
        get_preset("tiny").replace(scoring_func="relu")
    with pytest.raises(ValueError, match="neither a directory"):
        resolve_config("no-such-preset")


def test_v3_groups_of_one_expert_are_refused():
    """noaux_tc ranks a group by its top-2 scores (DeepSeek's Gate, transformers' router): a group of
    one expert has none, and the router failed at the first forward; V2's group max takes it."""
    tiny = get_preset("tiny")
    with pytest.raises(ValueError, match="at least 2"):
        tiny.replace(n_group=16, topk_group=8)
    tiny.replace(n_group=16, topk_group=8, scoring_func="softmax", topk_method="group_limited_greedy")
    tiny.replace(n_group=8, topk_group=4)
