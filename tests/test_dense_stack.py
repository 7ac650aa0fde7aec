"""The whole stack on a tiny Qwen2-layout model: sft, grpo, eval, distill (a Qwen2 student of a
DeepSeek teacher, R1 §2.4), chat and serve, each for a few steps; what they write is a checkpoint
that transformers loads as Qwen2ForCausalLM with the embedding and head still tied."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from nanoseek.checkpoint import build_model, load_model, save_model
from nanoseek.cli import main
from nanoseek.config import get_preset

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def qwen2_dir(micro_checkpoint, tmp_path_factory) -> str:
    """A tiny tied Qwen2 (GQA 2:1, QKV bias) with the micro checkpoint's task tokenizer."""
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(micro_checkpoint)
    cfg = get_preset("tiny-qwen2").replace(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=None,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    d = tmp_path_factory.mktemp("qwen2") / "init"
    save_model(build_model(cfg).init_weights(0), d)
    tok.save(d)
    return str(d)


def assert_qwen2_checkpoint(d: Path) -> None:
    """transformers reads it as Qwen2ForCausalLM with our logits; nanoseek's head is its embedding."""
    ours = load_model(d).eval()
    assert ours.config.model_type == "qwen2"
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert type(ref).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, ours.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, rtol=0, atol=1e-4)


def test_sft_on_qwen2(qwen2_dir, tmp_path):
    run = tmp_path / "run"
    argv = ["sft", "--init", qwen2_dir, "--task", "arithmetic", "--steps", "2", "--batch-size", "2"]
    assert main([*argv, "--seq-len", "64", "--out", str(run), "--no-progress"]) == 0
    out = run / "sft"
    assert_qwen2_checkpoint(out)
    before, after = load_model(qwen2_dir), load_model(out)
    assert not torch.equal(before.lm_head.weight, after.lm_head.weight)  # the tied matrix trained


def test_the_report_of_a_run_fine_tuned_by_hand_has_its_model_table(qwen2_dir, tmp_path):
    """`sft --init` a Qwen2 and `nanoseek report RUN`: only pretrain logged the model's figures, so the
    table read "–" throughout, under "KV-cache bytes per token (MLA, BF16)" for a GQA model."""
    from nanoseek.accounting import account
    from nanoseek.report import _human, build_report

    run = tmp_path / "run"
    argv = ["sft", "--init", qwen2_dir, "--task", "arithmetic", "--task-examples", "8", "--steps", "1"]
    assert main([*argv, "--batch-size", "2", "--seq-len", "64", "--out", str(run), "--no-progress"]) == 0
    acc = account(run / "sft")
    text = build_report(run).read_text()
    assert f"| parameters, total | {_human(acc.total_params)} |" in text
    assert f"| KV-cache bytes per token (GQA, BF16) | {acc.kv_cache_bytes_per_token:,} (" in text


def test_moe_and_mtp_flags_given_to_a_dense_pretraining_are_said(qwen2_dir, tmp_path, recwarn):
    """`pretrain --preset tiny-qwen2 --balance-alpha 0.01 --expert-load-every 5 --mtp-weight 0.5` trained
    a model without routers or MTP modules and said nothing of the flags; given, each is said once."""
    from nanoseek.train.pretrain import PretrainConfig, pretrain

    kw = dict(preset=qwen2_dir, tokenizer=qwen2_dir, steps=1, batch_size=2, seq_len=16, val_every=0)
    kw |= dict(precision="fp32", progress=False)
    pretrain(PretrainConfig(out=str(tmp_path / "quiet"), **kw))
    assert not [w for w in recwarn if "does nothing" in str(w.message)]
    given = dict(balance_alpha=0.01, expert_load_every=5, mtp_weight=0.5)
    pretrain(PretrainConfig(out=str(tmp_path / "given"), **given, **kw))
    said = [str(w.message) for w in recwarn if "does nothing" in str(w.message)]
    assert [s.split(" does")[0] for s in said] == [
        "--balance-alpha 0.01",
        "--expert-load-every 5",
        "--mtp-weight 0.5",
    ]


def test_grpo_on_qwen2(qwen2_dir, tmp_path):
    run = tmp_path / "run"
    argv = ["grpo", "--init", qwen2_dir, "--task", "arithmetic", "-G", "4", "-P", "2", "--steps", "1"]
    argv += ["--max-new-tokens", "8", "--micro-batch", "4", "--lr", "1e-3", "--reward", "language:1"]
    argv += ["--language", "en", "--train-pool", "64", "--no-progress", "--out", str(run)]
    assert main(argv) == 0
    assert_qwen2_checkpoint(run / "grpo")
    before, after = load_model(qwen2_dir), load_model(run / "grpo")
    assert not torch.equal(
        before.model.layers[0].self_attn.k_proj.bias, after.model.layers[0].self_attn.k_proj.bias
    )


def test_eval_on_qwen2(qwen2_dir, tmp_path):
    out = tmp_path / "eval.json"
    argv = ["eval", qwen2_dir, "--task", "arithmetic", "-k", "2", "--n", "2", "--max-new-tokens", "8"]
    assert main([*argv, "--no-progress", "--out", str(out), "--run-dir", str(tmp_path)]) == 0
    assert len(json.loads(out.read_text())["problems"]) == 2


def test_distill_into_a_qwen2_student(micro_checkpoint, tmp_path):
    """R1's recipe: a DeepSeek (MLA + MoE) teacher's traces train a Qwen2-layout student."""
    run = tmp_path / "run"
    argv = ["distill", "--teacher", micro_checkpoint, "--student", "tiny-qwen2", "--task", "arithmetic"]
    argv += ["-k", "2", "--prompts", "4", "--max-new-tokens", "8", "--fallback-reference", "--steps", "2"]
    argv += ["--batch-size", "2", "--seq-len", "64", "--out", str(run), "--no-progress"]
    assert main(argv) == 0
    assert_qwen2_checkpoint(run / "distill")
    cfg = load_model(run / "distill").config
    assert (cfg.num_key_value_heads, cfg.vocab_size) == (2, load_model(micro_checkpoint).config.vocab_size)


def test_chat_on_qwen2(qwen2_dir):
    import argparse

    from nanoseek.commands import chat

    parser = argparse.ArgumentParser()
    chat.register(parser.add_subparsers())
    args = parser.parse_args(["chat", qwen2_dir, "--max-new-tokens", "4", "--temperature", "0"])
    out = io.StringIO()
    assert chat.run(args, stdin=io.StringIO("1 + 2?\n/exit\n"), stdout=out) == 0
    assert "1 turn" in out.getvalue()


def test_serve_on_qwen2(qwen2_dir):
    import openai

    from nanoseek.engine import Engine
    from nanoseek.serve import ServeConfig, create_app
    from nanoseek.tokenizer import load_tokenizer
    from serve_fakes import LiveServer

    model = load_model(qwen2_dir).eval()
    engine = Engine(model, max_batch_size=4, max_seq_len=128)
    app = create_app(engine, load_tokenizer(qwen2_dir), ServeConfig(model_name="q"), model=model)
    with LiveServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "1 + 2?"}]
        r = client.chat.completions.create(model="q", messages=msgs, max_tokens=4, temperature=0)
        assert r.usage.completion_tokens >= 1
        r2 = client.completions.create(model="q", prompt="1 + 2", max_tokens=3, temperature=0)
        assert r2.usage.completion_tokens >= 1


def test_gguf_export_refuses_a_dense_family_with_the_way_out(qwen2_dir):
    from nanoseek.export import check_exportable

    with pytest.raises(ValueError, match="convert_hf_to_gguf"):
        check_exportable(load_model(qwen2_dir).config)


# R1-Distill's tokenizer_config.json chat template as DeepSeek ships it (one line in their file; split
# here for reading, the concatenation is the same string): system prompt first, tool turns, past
# reasoning dropped from assistant history, and the generation prompt that opens the think block.
R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + "
    "tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}"
    "{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


@pytest.fixture(scope="module")
def r1_distill_dir(qwen2_dir, tmp_path_factory) -> Path:
    """The tiny Qwen2 with a tokenizer_config.json shaped like R1-Distill-Qwen's (its template,
    special tokens as {"content": ...} dicts, LlamaTokenizerFast, BOS added)."""
    import shutil

    d = tmp_path_factory.mktemp("r1distill") / "ckpt"
    shutil.copytree(qwen2_dir, d)
    (d / "chat_template.jinja").unlink(missing_ok=True)

    def special(s: str) -> dict:
        return {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True, "rstrip": False}

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": special("<｜begin▁of▁sentence｜>"),
        "eos_token": special("<｜end▁of▁sentence｜>"),
        "pad_token": special("<｜end▁of▁sentence｜>"),
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 16384,
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
        "use_default_system_prompt": False,
        "chat_template": R1_DISTILL_TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return d


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "1 + 2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n3"},
    {"role": "user", "content": "and 2 + 2?"},
]


def test_r1_distill_chat_template_used_as_shipped(r1_distill_dir):
    from nanoseek.evaluate import chat_prompt_ids
    from nanoseek.tokenizer import load_tokenizer

    tok = load_tokenizer(r1_distill_dir)
    assert tok.chat_template == R1_DISTILL_TEMPLATE
    ours = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    ref = transformers.AutoTokenizer.from_pretrained(r1_distill_dir)
    theirs = ref.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert ours == theirs
    assert ours.endswith("<｜Assistant｜><think>\n") and "add them" not in ours  # past reasoning dropped
    assert tok.encode(ours) == ref(theirs, add_special_tokens=False)["input_ids"]
    ids = chat_prompt_ids(tok, "1 + 2?")
    assert ids[0] == tok.bos_token_id and ids[-2:] == tok.encode("<think>\n")


def test_r1_distill_serve_starts_in_reasoning(r1_distill_dir):
    """With the template's <think>\\n prefill the server reads the reply as reasoning until </think>."""
    import openai

    from nanoseek.serve import ServeConfig, create_app
    from nanoseek.tokenizer import load_tokenizer
    from serve_fakes import LiveServer, ScriptedEngine

    tok = load_tokenizer(r1_distill_dir)
    engine = ScriptedEngine(
        tok, lambda prompt, params: tok.encode("add them\n</think>\n\n3") + [tok.eos_token_id]
    )
    with LiveServer(create_app(engine, tok, ServeConfig(model_name="d"))) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="d", messages=CONVERSATION, max_tokens=20)
        msg = r.choices[0].message
        assert msg.content.strip() == "3" and msg.model_extra["reasoning_content"].strip() == "add them"
