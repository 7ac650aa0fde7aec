"""Distributed checkpoints across world sizes: 1 -> 2 (EP + FSDP2) -> 1 -> HF export.

One process saves a DCP checkpoint; two gloo processes build the model on the meta device, shard
experts (EP = 2) and the rest (FSDP2), load it (equal to the original, exactly), take an optimizer
step and save at world size 2 with the optimizer state; one process loads that into a plain model
(equal weights and Adam moments, exactly: DCP only moves bytes) and exports it to the HF layout,
which `nanoseek.load_model` and `transformers` both read.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gloo import run_ranks  # noqa: E402
from test_train_loop import batch_at, micro_model  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")


def _worker(dirs: str, world: int, rank: int, port: int) -> dict:
    src, dst, out = dirs.split("|")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from nanoseek.checkpoint import build_model
    from nanoseek.train.dcp import load_dcp, save_dcp
    from nanoseek.train.distributed import (
        destroy_distributed,
        full_model_state_dict,
        init_distributed,
        shard_batch,
        shard_model,
    )
    from nanoseek.train.expert_parallel import parallelize_experts
    from nanoseek.train.loop import language_model_loss

    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    reference = micro_model(seed=7)
    model = build_model(reference.config, device="meta")
    parallelize_experts(model)
    shard_model(model, info)
    model.to_empty(device="cpu")
    load_dcp(model, src)
    loaded = full_model_state_dict(model, info)  # gathered on rank 0 only
    for k, v in reference.state_dict().items():
        if rank == 0 and not k.endswith("expert_load"):
            assert torch.equal(loaded[k], v), k
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = (shard_batch(t, info) for t in batch_at(0))
    loss, _ = language_model_loss(model, x, y, mtp_weight=0.3)
    loss.backward()
    optimizer.step()
    save_dcp(model, dst, optimizer)
    full = full_model_state_dict(model, info)
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        torch.save({"model": full, "optim": optim["state"]}, out)
    destroy_distributed()
    return {"rank": rank}


@pytest.mark.slow
def test_save_world_1_load_world_2_save_load_world_1_export(tmp_path) -> None:
    import nanoseek
    from nanoseek.train.dcp import export_hf, is_dcp_checkpoint, load_dcp, save_dcp

    original = micro_model(seed=7)
    save_dcp(original, tmp_path / "ws1")
    assert is_dcp_checkpoint(tmp_path / "ws1") and (tmp_path / "ws1" / "config.json").exists()

    out = tmp_path / "ws2_state.pt"
    run_ranks(_worker, 2, f"{tmp_path / 'ws1'}|{tmp_path / 'ws2'}|{out}", str(tmp_path / "result"))
    assert sorted(p.name for p in (tmp_path / "ws2").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    ranks = torch.load(out, weights_only=True)

    # world size 2 -> 1: weights and optimizer state as the two ranks held them
    plain = micro_model(seed=123)
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    load_dcp(plain, tmp_path / "ws2", optimizer)
    state = plain.state_dict()
    changed = 0
    for k, v in ranks["model"].items():
        assert torch.equal(state[k], v), k
        changed += not torch.equal(v, original.state_dict()[k])
    assert changed > 10  # the step at world size 2 moved the weights, so the check has teeth
    names = dict(plain.named_parameters())
    expert = "model.layers.1.mlp.experts.gate_up_proj"
    moments = optimizer.state[names[expert]]
    assert torch.equal(moments["exp_avg"], ranks["optim"][expert]["exp_avg"])
    assert torch.equal(moments["exp_avg_sq"], ranks["optim"][expert]["exp_avg_sq"])
    embed = optimizer.state[names["model.embed_tokens.weight"]]["exp_avg"]
    assert torch.equal(embed, ranks["optim"]["model.embed_tokens.weight"]["exp_avg"])  # an FSDP2 shard pair
    assert float(moments["step"]) == 1.0

    # HF export: nanoseek and transformers both read it, same logits
    export_hf(tmp_path / "ws2", tmp_path / "hf")
    again = nanoseek.load_model(tmp_path / "hf").eval()
    for k, v in plain.state_dict().items():
        if not k.endswith("expert_load"):
            assert torch.equal(again.state_dict()[k], v), k
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = batch_at(5)[0]
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, plain.eval()(ids), rtol=1e-4, atol=1e-4)


def test_dcp_errors_name_the_problem(tmp_path) -> None:
    from nanoseek.model.transformer import DeepSeekV3
    from nanoseek.train.dcp import export_hf, is_dcp_checkpoint, load_dcp, save_dcp

    with pytest.raises(FileNotFoundError, match="not a torch.distributed.checkpoint"):
        export_hf(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a torch.distributed.checkpoint"):
        load_dcp(micro_model(), tmp_path)
    save_dcp(micro_model(), tmp_path / "ckpt")
    other = micro_model(mtp=0)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        load_dcp(other, tmp_path / "ckpt")
    fewer_experts = DeepSeekV3.build(micro_model().config.replace(n_routed_experts=4))
    with pytest.raises(ValueError, match=r"another model shape.*n_routed_experts': \(8, 4\)"):
        load_dcp(fewer_experts, tmp_path / "ckpt")
    same = micro_model()
    with pytest.raises(
        ValueError, match=r"could not load .* RuntimeError: Missing key .*optim\.param_groups"
    ):
        load_dcp(same, tmp_path / "ckpt", torch.optim.AdamW(same.parameters()))  # saved without one
    # out_dir naming the DCP checkpoint itself: refused, the shards (and a run's optimizer state) kept
    with pytest.raises(ValueError, match="is the DCP checkpoint being exported"):
        export_hf(tmp_path / "ckpt", tmp_path / "ckpt")
    # ...or the directory holding it (the run's): replaced whole, the DCP checkpoint went with it
    with pytest.raises(ValueError, match="is a directory holding the DCP checkpoint being exported"):
        export_hf(tmp_path / "ckpt", tmp_path)
    assert is_dcp_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()  # a DCP checkpoint another tool wrote
    narrower = DeepSeekV3.build(micro_model().config.replace(moe_intermediate_size=8))
    with pytest.raises(
        ValueError, match=r"could not load DCP checkpoint .* into this model: ValueError: Size mismatch"
    ):
        load_dcp(narrower, tmp_path / "ckpt")  # with no config.json to compare, DCP's own error, named
    with pytest.raises(FileNotFoundError, match="has no config.json: it was not written by nanoseek"):
        export_hf(tmp_path / "ckpt", tmp_path / "out")
    model = micro_model(seed=1)
    load_dcp(model, tmp_path / "ckpt")  # a model that has its config loads it all the same
    assert torch.equal(model.lm_head.weight, micro_model().lm_head.weight)


def test_export_hf_keeps_a_chat_template_saved_in_its_own_file(tmp_path) -> None:
    import json

    from model_configs import CHATML, chatml_tokenizer
    from nanoseek.tokenizer import load_tokenizer
    from nanoseek.train.dcp import export_hf, save_dcp

    ckpt = tmp_path / "ckpt"
    save_dcp(micro_model(), ckpt)
    # the tokenizer as transformers 5's save_pretrained writes it: the template in chat_template.jinja
    chatml_tokenizer(ckpt)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "chat_template.jinja").write_text(config.pop("chat_template"))
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(ckpt).chat_template == CHATML
    export_hf(ckpt, tmp_path / "hf")
    assert load_tokenizer(tmp_path / "hf").chat_template == CHATML


def test_load_dcp_puts_back_a_checkpoint_a_crash_left_aside(tmp_path) -> None:
    from nanoseek.train.dcp import load_dcp, save_dcp

    original = micro_model(seed=3)
    save_dcp(original, tmp_path / "ckpt")
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.tmp-old")  # killed between atomic_directory's renames
    model = micro_model(seed=4)
    load_dcp(model, tmp_path / "ckpt")
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)


def test_export_hf_reads_a_checkpoint_left_aside_mid_save_where_it_lies(tmp_path) -> None:
    """`export_hf` while a training run's `save_dcp` is between its two renames (the last checkpoint
    moved aside, the new one about to be renamed in): it exports the copy aside and leaves it there;
    moved back, the save's second rename failed ("Directory not empty") and the new checkpoint was lost."""
    from safetensors.torch import load_file

    import nanoseek
    from nanoseek.train.dcp import export_hf, save_dcp

    original = micro_model(seed=3)
    save_dcp(original, tmp_path / "ckpt")
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.tmp-old")  # the save's first rename
    export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype=torch.bfloat16)
    assert not (tmp_path / "ckpt").exists() and (tmp_path / ".ckpt.tmp-old").is_dir()
    tensors = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        tensors.update(load_file(f))
    assert tensors["lm_head.weight"].dtype == torch.bfloat16  # the dtype asked for
    assert torch.equal(tensors["lm_head.weight"], original.lm_head.weight.to(torch.bfloat16))
    assert torch.equal(nanoseek.load_model(tmp_path / "hf").lm_head.weight, tensors["lm_head.weight"].float())


def test_load_dcp_into_a_model_materialized_from_meta_rebuilds_what_is_not_saved(tmp_path) -> None:
    """`to_empty` leaves every tensor uninitialized, the buffers DCP does not save (RoPE tables, load
    counters) too: after `load_dcp` the model computes what the saved one did."""
    from nanoseek.checkpoint import build_model
    from nanoseek.train.dcp import load_dcp, save_dcp

    original = micro_model(seed=2).eval()
    save_dcp(original, tmp_path / "ckpt")
    model = build_model(original.config, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.fill_(float("nan") if buffer.is_floating_point() else 7)  # what to_empty may leave
    load_dcp(model, tmp_path / "ckpt")
    ids = batch_at(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), original(ids), rtol=0, atol=0)


def test_optimizer_state_round_trips_as_it_was_before_any_update_and_without_mtp(tmp_path) -> None:
    """torch's state-dict helpers give an optimizer without state a zero-gradient step for every
    parameter: a save before the first update must not change the updates after it (AdamW's bias
    correction), and parameters that never had a gradient (the MTP modules with λ = 0, the default)
    must not keep a checkpoint saved after updates from loading."""
    from nanoseek.train.dcp import load_dcp, save_dcp
    from nanoseek.train.loop import language_model_loss

    def train(model, optimizer, steps: range) -> dict:
        for i in steps:
            loss, _ = language_model_loss(model, *batch_at(i))  # mtp_weight=0: the MTP layer gets no gradient
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model.state_dict()

    def adamw(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-2)

    reference = micro_model(seed=1)
    expected = train(reference, adamw(reference), range(3))

    model = micro_model(seed=1)
    optimizer = adamw(model)
    save_dcp(model, tmp_path / "fresh", optimizer)  # before the first update
    assert not optimizer.state
    loaded = micro_model(seed=5)
    loaded_optimizer = adamw(loaded)
    load_dcp(loaded, tmp_path / "fresh", loaded_optimizer)
    assert not loaded_optimizer.state
    train(model, optimizer, range(1))
    train(loaded, loaded_optimizer, range(1))

    save_dcp(model, tmp_path / "stepped", optimizer)  # no state for the MTP layer's parameters
    resumed = micro_model(seed=5)
    resumed_optimizer = adamw(resumed)
    load_dcp(resumed, tmp_path / "stepped", resumed_optimizer)
    assert len(resumed_optimizer.state) == len(optimizer.state) < sum(1 for _ in model.parameters())
    for state in (
        train(m, o, range(1, 3))
        for m, o in ((model, optimizer), (loaded, loaded_optimizer), (resumed, resumed_optimizer))
    ):
        for k, v in expected.items():
            assert torch.equal(state[k], v), k


def test_export_hf_copies_the_generation_config_and_special_tokens_map_saved_beside(tmp_path) -> None:
    """The files a tokenizer saves beside a DCP checkpoint go into the HF directory as they are:
    generation_config.json (the ids that end a generation, the sampling defaults) and
    special_tokens_map.json, not only tokenizer.json and tokenizer_config.json."""
    import json

    from nanoseek.train.dcp import export_hf, save_dcp

    ckpt = tmp_path / "ckpt"
    save_dcp(micro_model(), ckpt)
    written = {
        "generation_config.json": json.dumps({"eos_token_id": [1, 5], "temperature": 0.6, "top_p": 0.95}),
        "special_tokens_map.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}),
    }
    for name, text in written.items():
        (ckpt / name).write_text(text)
    export_hf(ckpt, tmp_path / "hf")
    for name, text in written.items():
        assert (tmp_path / "hf" / name).read_text() == text, name


@pytest.mark.parametrize(
    ("field", "change"), [("vocab_size", 8), ("num_hidden_layers", 1), ("hidden_size", 16)]
)
def test_a_model_of_another_size_is_refused_by_the_field_that_differs(tmp_path, field, change) -> None:
    """Before DCP reads a tensor: the config saved beside the shards and the model's differ in a field
    that sets tensor shapes, and the error names that field with both values (saved, model)."""
    from nanoseek.model.transformer import DeepSeekV3
    from nanoseek.train.dcp import load_dcp, save_dcp

    saved = micro_model()
    save_dcp(saved, tmp_path / "ckpt")
    value = getattr(saved.config, field)
    other = DeepSeekV3.build(saved.config.replace(**{field: value + change}))
    with pytest.raises(ValueError, match=rf"another model shape.*'{field}': \({value}, {value + change}\)"):
        load_dcp(other, tmp_path / "ckpt")
