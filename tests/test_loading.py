"""Loading real checkpoints: streamed into their final dtype/storage, Hub names, and one clear error
for each kind of broken directory."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants as hub_constants
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tests.model_configs import small_config

import nanoseek
from nanoseek.checkpoint import (
    HUB_FILES,
    build_model,
    check_keys,
    from_hf_state_dict,
    read_safetensors,
    resolve_checkpoint,
    save_model,
)
from nanoseek.cli import main as cli
from nanoseek.config import ModelConfig
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.quantize import QuantLinear, QuantRoutedExperts, quantize_model, w8a8_available


def config(**changes) -> ModelConfig:
    """The shared small shape, with an MTP layer (its weights stream too), and the vocabulary of the
    micro checkpoint's tokenizer (400 tokens), which `with_tokenizer` gives a broken directory."""
    return small_config(**{"num_nextn_predict_layers": 1, "vocab_size": 400, **changes})


@pytest.fixture
def saved(tmp_path):
    """A tiny MTP model saved in several shards, and the model."""
    model = build_model(config()).init_weights(0)
    with torch.no_grad():  # a nonzero balancing bias, so that streaming it over the reset one shows
        for _, router in model.routers():
            router.e_score_correction_bias.uniform_(-1, 1)
    d = save_model(model, tmp_path / "ckpt", max_shard_bytes=20_000)
    assert len(list(d.glob("model-*.safetensors"))) > 2
    return d, model


# ------------------------------------------------------------- streaming
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_load_equals_the_in_memory_conversion(saved, dtype):
    d, model = saved
    loaded = nanoseek.load_model(d, dtype=dtype)
    cfg = loaded.config
    want = from_hf_state_dict(read_safetensors(d), cfg, dtype)
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    for (name, a), b in zip(model.named_buffers(), loaded.buffers(), strict=True):  # RoPE, router state
        assert torch.equal(a.to(b.dtype), b), name
    ids = torch.randint(0, 64, (2, 10))
    if dtype == torch.float32:
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "w8a8"])
def test_quantized_as_it_streams_equals_the_engine_quantizing_after_loading(saved, fmt):
    """w8a8 too: its CPU-only check once read the device of the meta placeholders the stream fills,
    and refused every checkpoint (`generate --quantize w8a8`: 'runs on CPUs ... not on meta')."""
    if fmt == "w8a8" and not w8a8_available():
        pytest.skip("this PyTorch has no quantized CPU backend")
    d, _ = saved
    streamed = nanoseek.load_model(d, dtype=torch.bfloat16, quantize=fmt)
    after = quantize_model(nanoseek.load_model(d, dtype=torch.bfloat16), fmt)
    assert any(isinstance(m, QuantRoutedExperts) for m in streamed.modules())
    assert sum(isinstance(m, QuantLinear) for m in streamed.modules()) == sum(
        isinstance(m, QuantLinear) for m in after.modules()
    )
    a, b = streamed.state_dict(), after.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].float(), b[k].float()), k
    # The engine takes the quantized model as it is (quantizing again is a no-op).
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    outs = [
        Engine(m, max_batch_size=1, quantize=fmt).generate([[1, 2, 3]], params)[0] for m in (streamed, after)
    ]
    assert outs[0] == outs[1]


def test_fp8_storage_streams_too(saved):
    d, _ = saved
    from nanoseek.model.fp8 import FP8Linear

    m = nanoseek.load_model(d, fp8=True)
    assert any(isinstance(x, FP8Linear) for x in m.modules())
    assert not any(t.is_meta for t in m.parameters())


def test_fp8_and_quantize_are_one_or_the_other(saved):
    with pytest.raises(ValueError, match="choose one"):
        nanoseek.load_model(saved[0], fp8=True, quantize="int8")


# ------------------------------------------------------------- hub names
@pytest.fixture
def fake_hub(monkeypatch, tmp_path, saved):
    """snapshot_download mocked: records its calls and returns the saved tiny checkpoint."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(saved[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_hub_name_is_downloaded_through_huggingface_hub(fake_hub, saved):
    model = nanoseek.load_model("deepseek-ai/DeepSeek-R1-Distill-Tiny")
    assert fake_hub == [("deepseek-ai/DeepSeek-R1-Distill-Tiny", {"allow_patterns": list(HUB_FILES)})]
    for (k, a), b in zip(saved[1].state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # A local directory is never looked up on the Hub, nor is a preset.
    nanoseek.load_model(saved[0])
    nanoseek.load_model("tiny")
    assert len(fake_hub) == 1


def test_inspect_and_cost_fetch_a_hub_models_config_alone(fake_hub, saved, capsys):
    """`nanoseek inspect deepseek-ai/DeepSeek-V3` (a shape to count, not 700 GB of weights to fetch) was
    "neither a directory with config.json nor a preset"; cost counted as inspect does."""
    from nanoseek.cli import main

    assert main(["inspect", "someone/tiny-model", "--json"]) == 0
    assert fake_hub == [("someone/tiny-model", {"allow_patterns": ["config.json"]})]
    counted = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(saved[0]), "--json"]) == 0
    assert {**json.loads(capsys.readouterr().out), "model": "someone/tiny-model"} == counted
    assert main(["cost", "someone/tiny-model", "--tokens", "1e9", "--json"]) == 0
    assert main(["cost", str(saved[0]), "--tokens", "1e9", "--json"]) == 0
    hub, local = capsys.readouterr().out.strip().split("\n}\n")
    assert json.loads(hub + "}")["flops_per_token"] == json.loads(local)["flops_per_token"]
    calls = len(fake_hub)
    assert main(["cost", "someone/other-model", "--tokens", "lots"]) == 2  # a bad flag: nothing fetched first
    assert len(fake_hub) == calls and "--tokens" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--mfu", "2", "mfu"),
        ("--gpus", "0", "GPU count"),
        ("--usd-per-gpu-hour", "-1", "price"),
        ("--seq-len", "0", "seq_len"),
    ],
)
def test_cost_refuses_each_bad_flag_before_a_hub_fetch(fake_hub, flag, value, said, capsys):
    """Every flag the price needs is checked before a Hub name's config.json is fetched, not --tokens
    alone: `--mfu 2` was said after a download (offline: the Hub's error, hiding the flag's)."""
    assert cli(["cost", "someone/other-model", "--tokens", "1e9", flag, value]) == 2
    assert fake_hub == [] and said in capsys.readouterr().err


def test_a_hub_download_keeps_the_chat_template_file(monkeypatch, tmp_path, micro_checkpoint):
    """A repo whose chat template is only in chat_template.jinja (as transformers 5 saves it) loads with
    that template from the Hub, as from a local directory: the download takes the file."""
    import shutil

    from huggingface_hub.utils import filter_repo_objects

    from nanoseek.tokenizer import load_tokenizer

    repo = shutil.copytree(micro_checkpoint, tmp_path / "repo")
    tok_config = json.loads((repo / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = tok_config.pop("chat_template") + "{# the repo's own #}"
    (repo / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
    (repo / "chat_template.jinja").write_text(template, encoding="utf-8")
    assert load_tokenizer(repo).chat_template == template

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):  # what the Hub's download keeps
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir()
        for name in filter_repo_objects([f.name for f in repo.iterdir()], allow_patterns=allow_patterns):
            shutil.copy(repo / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert load_tokenizer(resolve_checkpoint("someone/templated", tokenizer=True)).chat_template == template


def test_load_tokenizer_takes_the_hub_name_load_model_takes(fake_hub, monkeypatch, micro_checkpoint):
    """`nanoseek.load_tokenizer("owner/name")` fetches as `load_model` does (and as transformers'
    AutoTokenizer.from_pretrained takes a Hub name), instead of 'tokenizer not found: owner/name'."""
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: micro_checkpoint)
    tok = nanoseek.load_tokenizer("someone/micro")
    assert tok.encode("1 + 1 = 2") == nanoseek.load_tokenizer(micro_checkpoint).encode("1 + 1 = 2")


def test_cli_commands_take_hub_names(fake_hub, monkeypatch, micro_checkpoint, capsys):
    def snapshot_download(repo_id, **kwargs):
        fake_hub.append(repo_id)
        return micro_checkpoint

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    rc = cli(["generate", "someone/micro", "--prompt", "1+1", "--max-new-tokens", "3", "--quantize", "int8"])
    assert rc == 0, capsys.readouterr().err
    assert fake_hub == ["someone/micro"]


def test_offline_hub_name_is_one_clear_error(monkeypatch, tmp_path, capsys):
    """For real: HF_HUB_OFFLINE (the tests' setting) with an empty cache, then the Hub unreachable."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"offline.*local checkpoint directory"):
        resolve_checkpoint("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: unreachable
    with pytest.raises(FileNotFoundError, match=r"offline.*hf download deepseek-ai/X --local-dir"):
        nanoseek.load_model("deepseek-ai/X")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert cli(["generate", "deepseek-ai/X", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("nanoseek generate: error: deepseek-ai/X is not a local directory") and "\n" not in err
    )


def test_offline_inspect_names_the_config_alone_to_download(monkeypatch, tmp_path, capsys):
    """inspect and cost read a Hub model's config.json alone, but offline they told the user to fetch the
    whole repository (`hf download deepseek-ai/DeepSeek-V3 --local-dir DIR`: 700 GB of weights)."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    for command in (["inspect", "deepseek-ai/X"], ["cost", "deepseek-ai/X", "--tokens", "1e9"]):
        assert cli(command) == 2
        assert "`hf download deepseek-ai/X --include config.json --local-dir DIR`" in capsys.readouterr().err


def hub_cache(monkeypatch, cache, repo_id, files, commit="0123456789abcdef0123456789abcdef01234567"):
    """`files` laid out as huggingface_hub's cache holds a download of `repo_id` (blobs, the snapshot's
    relative symlinks to them, refs/main), with the Hub offline."""
    import hashlib
    import os

    from huggingface_hub import _snapshot_download

    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    for f in files:
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    # huggingface_hub 0.24 (the declared minimum) reads its own copy of the constant, taken at import
    monkeypatch.setattr(_snapshot_download, "HF_HUB_CACHE", str(cache), raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_a_hub_model_in_the_cache_loads_offline(saved, micro_checkpoint, monkeypatch, tmp_path, capsys):
    """For real, no snapshot_download mocked: a sharded checkpoint in the Hub's cache loads by its name,
    and what its snapshot lacks (a download of some files only) is named with the snapshot's path; a name
    the cache lacks names the cache it looked in."""
    from pathlib import Path

    d, model = saved
    cache = tmp_path / "hub"
    hub_cache(monkeypatch, cache, "someone/sharded", sorted(d.iterdir()))
    loaded = nanoseek.load_model("someone/sharded")
    ids = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(
        FileNotFoundError, match=r"someone/sharded \(the Hub's cached snapshot .*hub.*\) has no tok"
    ):
        resolve_checkpoint("someone/sharded", tokenizer=True)

    micro = sorted(Path(micro_checkpoint).iterdir())
    hub_cache(monkeypatch, cache, "someone/micro", micro)
    assert cli(["generate", "someone/micro", "--prompt", "1+1", "--max-new-tokens", "2"]) == 0
    with pytest.raises(FileNotFoundError, match=f"not in the Hub's cache {cache}"):
        resolve_checkpoint("someone/absent")
    # a local directory of the same name is read first, and the error says so
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone" / "micro").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no config.json.*local directory is read before the Hub"):
        resolve_checkpoint("someone/micro")


def test_a_cached_snapshot_without_weights_names_the_hub_model_to_download(
    micro_checkpoint, monkeypatch, tmp_path, capsys
):
    """A snapshot with config.json and the tokenizer but no weights (a download cut short, or `inspect`'s
    config.json), offline, ended with "no safetensors weights in <snapshot path>": it says the snapshot is
    incomplete and names the Hub model and `hf download owner/name`."""
    from pathlib import Path

    files = [f for f in sorted(Path(micro_checkpoint).iterdir()) if f.suffix != ".safetensors"]
    hub_cache(monkeypatch, tmp_path / "hub", "someone/bare", files)
    said = (
        r"no safetensors weights in .*: the Hugging Face Hub's cached snapshot of someone/bare is incomplete"
    )
    with pytest.raises(FileNotFoundError, match=said + r".*`hf download someone/bare`"):
        nanoseek.load_model("someone/bare")
    assert cli(["generate", "someone/bare", "--prompt", "1+1"]) == 2
    assert "hf download someone/bare" in capsys.readouterr().err


def test_a_hub_that_never_answers_is_given_up_on(micro_checkpoint, monkeypatch, tmp_path):
    """A proxy or firewall that takes the connection and never answers hung a load for good (snapshot_download
    asks the Hub with no time limit), a cached model's too: after HF_HUB_ETAG_TIMEOUT the cache is read,
    and a model it lacks is one clear error."""
    import socket
    from pathlib import Path

    real_download = huggingface_hub.snapshot_download

    def snapshot_download(repo_id, **kwargs):
        if not kwargs.get("local_files_only"):
            pytest.fail("asked the Hub with no time limit: this hangs")
        return real_download(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    hub_cache(monkeypatch, tmp_path / "hub", "someone/micro", sorted(Path(micro_checkpoint).iterdir()))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_ETAG_TIMEOUT", 1)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # connections queue, none is ever answered
        monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        assert (resolve_checkpoint("someone/micro", tokenizer=True) / "model.safetensors").is_file()
        with pytest.raises(
            FileNotFoundError, match=r"offline \(the Hub unreachable: .*not in the Hub's cache"
        ):
            resolve_checkpoint("someone/absent")


def test_gated_and_private_models_name_the_token(monkeypatch, tmp_path):
    """A gated model was 'not a model on the Hugging Face Hub (or it is private: log in with `hf auth
    login`)': it is named gated, with where to accept its terms, and HF_TOKEN, as for a private one."""
    import http.server
    import threading

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # the Hub's answers to a request without a token that has access
            self.send_response(401 if "gated" in self.path else 404)
            self.send_header("X-Error-Code", "GatedRepo" if "gated" in self.path else "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(
            FileNotFoundError, match=r"someone/gated is a gated model .*someone/gated.*HF_TOKEN"
        ):
            resolve_checkpoint("someone/gated")
        with pytest.raises(
            FileNotFoundError, match=r"nor a model on the Hugging Face Hub .*private.*HF_TOKEN"
        ):
            resolve_checkpoint("someone/private")
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_directory_no_hub_name_can_be_is_said_so(capsys):
    """`ckpt/run--2`, a local directory that is not there, has a Hub name's shape: the error was the Hub's
    'Cannot have -- or .. in repo_id', without saying there is no such directory."""
    assert cli(["inspect", "ckpt/run--2"]) == 2
    assert "ckpt/run--2 is not a local directory, nor a Hub name (" in capsys.readouterr().err


def test_an_incomplete_cached_snapshot_is_named_as_such(monkeypatch, tmp_path):
    """Offline, huggingface_hub refuses a snapshot its cached listing shows incomplete: the error says
    so (not that the model is absent from the cache) and where it is."""
    incomplete = getattr(huggingface_hub.errors, "IncompleteSnapshotError", None)
    if incomplete is None:
        pytest.skip("this huggingface_hub has no IncompleteSnapshotError")

    def snapshot_download(repo_id, **kwargs):
        raise incomplete("is incomplete: 2 file(s) are missing", snapshot_path=str(tmp_path / "snap"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(FileNotFoundError, match=f"cached snapshot {tmp_path / 'snap'} is incomplete"):
        resolve_checkpoint("someone/partial")


def test_hub_errors_are_caught_where_huggingface_hub_0_24_has_them(monkeypatch):
    """huggingface_hub 0.24 (the declared minimum) has its error classes in huggingface_hub.utils, not
    yet in huggingface_hub.errors: a failed download is still one clear error there, not an ImportError."""
    import sys
    import types

    from huggingface_hub.utils import LocalEntryNotFoundError

    def snapshot_download(repo_id, **kwargs):
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    utils = types.ModuleType("huggingface_hub.utils")  # 0.24's layout, whatever is installed
    names = ("GatedRepoError", "HfHubHTTPError", "HFValidationError", "LocalEntryNotFoundError")
    for name in (*names, "RepositoryNotFoundError"):
        setattr(utils, name, getattr(sys.modules["huggingface_hub.utils"], name))
    monkeypatch.setitem(sys.modules, "huggingface_hub.utils", utils)
    monkeypatch.setitem(sys.modules, "huggingface_hub.errors", types.ModuleType("huggingface_hub.errors"))
    with pytest.raises(FileNotFoundError, match="someone/absent is not a local directory.*offline"):
        resolve_checkpoint("someone/absent")


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="--init .* no such directory"):
        resolve_checkpoint(tmp_path / "a" / "b" / "c", flag="--init")


# ------------------------------------------------------------- bad input
def one_line_error(capsys, directory) -> str:
    """What `nanoseek generate DIR` prints: one line, no traceback."""
    assert cli(["generate", str(directory), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanoseek generate: error: ") and "\n" not in err and "Traceback" not in err
    return err


def with_tokenizer(d, micro_checkpoint) -> None:
    """The CLI checks for a tokenizer before reading weights: give the broken directory one."""
    import shutil

    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = f"{micro_checkpoint}/{name}"
        shutil.copy(src, d / name)


def test_missing_shard(saved, capsys, micro_checkpoint):
    d, _ = saved
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(
        FileNotFoundError, match=rf"model\.safetensors\.index\.json names .*{shard.name}.*incomplete"
    ):
        nanoseek.load_model(d)
    with_tokenizer(d, micro_checkpoint)
    assert shard.name in one_line_error(capsys, d)


def test_truncated_safetensors(saved, capsys, micro_checkpoint):
    d, _ = saved
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shard.name} is not a readable safetensors file.*truncated"):
        nanoseek.load_model(d)
    with_tokenizer(d, micro_checkpoint)
    assert "truncated" in one_line_error(capsys, d)


def test_unknown_model_type(saved, capsys, micro_checkpoint):
    d, _ = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: unsupported model_type 'mamba'"):
        nanoseek.load_model(d)
    with_tokenizer(d, micro_checkpoint)
    assert "model_type 'mamba'" in one_line_error(capsys, d)


def test_a_layer_count_past_the_weights_is_refused_before_the_model_is_built(saved, capsys, micro_checkpoint):
    """`num_hidden_layers: 1000000` (a typo) kept inspect, generate and export building the model on the
    meta device for minutes before the key check; inspect counted a model the files do not hold. The
    files' keys (their headers) say it first."""
    from nanoseek.checkpoint import checkpoint_config

    d, _ = saved
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 30}))
    message = rf"num_hidden_layers=30 but the weights in {d} hold layers 0\.\.3"
    for load in (nanoseek.load_model, checkpoint_config):
        with pytest.raises(ValueError, match=message):
            load(d)
    assert cli(["inspect", str(d)]) == 2
    assert "num_hidden_layers=30" in capsys.readouterr().err
    with_tokenizer(d, micro_checkpoint)
    assert "num_hidden_layers=30" in one_line_error(capsys, d)


def test_weights_under_another_prefix_are_named_as_such_not_as_a_wrong_config(
    tmp_path, capsys, micro_checkpoint
):
    """Weights saved with a wrapper's prefix (torch.compile's `_orig_mod.`) hold no `model.layers.N`
    key: the layer-count check said their config.json was another model's, which it is not."""
    from safetensors.torch import load_file, save_file

    d = save_model(build_model(config()).init_weights(0), tmp_path / "ckpt")
    tensors = load_file(str(d / "model.safetensors"))
    save_file({f"_orig_mod.{k}": v for k, v in tensors.items()}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"name no tensor model\.\* \(as '_orig_mod\.") as e:
        nanoseek.load_model(d)
    assert "config.json" not in str(e.value)
    with_tokenizer(d, micro_checkpoint)
    assert "_orig_mod." in one_line_error(capsys, d)


def test_config_and_weights_disagree_on_a_shape(saved, capsys, micro_checkpoint):
    d, _ = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["kv_lora_rank"] = 24
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"self_attn\.kv_a_\w+\.weight: shape .* in .*model-\d+-of-\d+\.safetensors != "
    ):
        nanoseek.load_model(d)
    with_tokenizer(d, micro_checkpoint)
    assert "another config.json" in one_line_error(capsys, d)


def test_a_shard_from_another_checkpoint(saved):
    d, _ = saved
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = sorted(set(index["weight_map"].values()) - {index["weight_map"][key]})[0]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="does not belong to this checkpoint"):
        nanoseek.load_model(d)


def test_a_tensor_in_two_shards_is_read_from_the_one_the_index_names(saved):
    """The index's weight_map decides: a stale copy of a tensor in another shard (a shard rewritten
    by hand, a merge) is not read."""
    from safetensors.torch import load_file, save_file

    d, model = saved
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    last = load_file(str(d / shards[-1]))
    last[key] = torch.zeros_like(model.state_dict()[key])
    save_file(last, str(d / shards[-1]))
    assert torch.equal(nanoseek.load_model(d).state_dict()[key], model.state_dict()[key])


def test_a_missing_relative_path_is_not_a_hub_name(fake_hub, tmp_path, monkeypatch):
    """./dir and ../dir are paths (no Hub name starts with a dot): one that does not exist is named as
    such, never looked up on the Hub."""
    monkeypatch.chdir(tmp_path)
    for path in ("./no-such-checkpoint", "../no-such-checkpoint"):
        with pytest.raises(FileNotFoundError, match="no such directory"):
            resolve_checkpoint(path)
    assert fake_hub == []


def test_load_model_expands_a_leading_tilde(saved, monkeypatch):
    """`load_model("~/ckpt")` loads the checkpoint in the home directory, as `resolve_checkpoint` reads
    it: it was taken for a preset name ("neither a directory with config.json nor a preset")."""
    d, model = saved
    monkeypatch.setenv("HOME", str(d.parent))
    loaded = nanoseek.load_model(f"~/{d.name}")
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_a_tilde_path_with_no_checkpoint_at_home_is_an_error_not_random_weights(saved, tmp_path, monkeypatch):
    """`load_model("~/ckpt")` with no checkpoint at $HOME/ckpt, beside a directory literally named `~`
    (what `save_model(model, "~/ckpt")` writes, unexpanded): it was taken for a preset and built with
    random weights from the config.json it found at ./~/ckpt, silently; it must fail, naming the path."""
    d, _ = saved
    shutil.copytree(d, tmp_path / "cwd" / "~" / "ckpt")
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ValueError, match=r"home.ckpt' is neither a directory with config.json nor a preset"):
        nanoseek.load_model("~/ckpt")


def test_experts_of_another_width_name_their_shard(saved):
    """config.json's moe_intermediate_size differs from the files': the stacked experts' error names
    the shard they came from, as every other mis-shaped tensor's does."""
    d, _ = saved
    cfg = json.loads((d / "config.json").read_text())
    cfg["moe_intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ValueError, match=r"experts\.\w+_proj: shape .* in .*model-\d+-of-\d+\.safetensors != "
    ):
        nanoseek.load_model(d)


def test_check_keys_names_the_file():
    model = build_model(config(), device="meta")
    bad = {k: torch.empty(1, device="meta") for k in model.state_dict()}
    with pytest.raises(ValueError, match="in shard-7.safetensors"):
        check_keys(model, bad, "x", dict.fromkeys(bad, "shard-7.safetensors"))


def test_an_expert_missing_a_projection(saved):
    from safetensors.torch import load_file, save_file

    d, _ = saved
    key = "model.layers.1.mlp.experts.2.up_proj.weight"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"].pop(key)
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"experts\.2: its gate/up/down projections .* incomplete"):
        nanoseek.load_model(d)


@pytest.mark.parametrize("model_type", ["qwen2", "deepseek_v2"])
def test_layers_past_the_configs_count_are_unexpected(tmp_path, model_type):
    """Only DeepSeek-V3 files (or a config with MTP) hold MTP layers after the main ones: in a Qwen2,
    Llama or V2 checkpoint a layer config.json does not count is an error, not silently dropped."""
    family = {
        "qwen2": {"num_key_value_heads": 2},
        "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy"},
    }
    cfg = small_config(model_type=model_type, **family[model_type])
    d = save_model(build_model(cfg).init_weights(0), tmp_path / "ckpt")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unexpected \['model\.layers\.2\."):
        nanoseek.load_model(d)


def test_quantized_loading_leaves_torch_dynamo_unimported(saved):
    """Placeholders on the meta device are made without meta reductions, which would import
    torch._dynamo (~2 s more for every `nanoseek generate --quantize`)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from nanoseek.checkpoint import load_model\n"
        f"load_model({str(saved[0])!r}, dtype=torch.bfloat16, quantize='int8')\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "argv",
    [
        ["chat", "deepseek-ai/X"],
        ["serve", "deepseek-ai/X"],
        ["eval", "deepseek-ai/X", "--task", "arithmetic"],
        ["sft", "--init", "deepseek-ai/X", "--task", "arithmetic"],
        ["grpo", "--init", "deepseek-ai/X", "--task", "arithmetic"],
        ["distill", "--teacher", "deepseek-ai/X", "--student", "tiny", "--task", "arithmetic"],
    ],
)
def test_every_command_resolves_hub_names(argv, monkeypatch, tmp_path, capsys):
    """Each command that reads a checkpoint goes through resolve_checkpoint: offline, the same line."""
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "run")] if argv[0] in ("sft", "grpo", "distill") else []
    assert cli(argv + out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nanoseek {argv[0]}: error: ") and "\n" not in err
    assert "deepseek-ai/X is not a local directory" in err and "hf download" in err


# ------------------------------------------------------------- benchmarks/bench_loading.py
def test_bench_loading_deletes_only_the_checkpoint_it_wrote(saved, tmp_path, monkeypatch, capsys):
    """`--reuse` loads a checkpoint that was there before (a downloaded model, one written with --keep):
    it stays. A --dir holding other files is refused before anything is written there (the directory
    the benchmark writes is deleted afterwards)."""
    from tests.benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_loading")
    directory, _ = saved
    bench.main(["--dir", str(directory), "--reuse", "--formats", "bf16"])
    assert (directory / "config.json").exists()
    layers = config().num_hidden_layers  # the checkpoint's, not --layers' default
    assert f"bench_loading: {layers}-layer" in capsys.readouterr().out

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail("wrote into a non-empty --dir"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--dir", str(other), "--formats", "bf16"])
    assert e.value.code == 2
    assert (other / "notes.txt").read_text() == "precious"
    with pytest.raises(SystemExit):  # nothing to reuse
        bench.main(["--dir", str(tmp_path / "empty"), "--reuse"])


def test_bench_loading_json_is_all_of_stdout(saved, capsys):
    """`--json` prints the figures as one JSON object: stdout parses as it, the summary line goes to
    stderr (as bench_model's --json leaves stdout to its object)."""
    from tests.benchmark_scripts import load_benchmark

    bench = load_benchmark("bench_loading")
    directory, _ = saved
    bench.main(["--dir", str(directory), "--reuse", "--formats", "bf16", "--json"])
    out, err = capsys.readouterr()
    figures = json.loads(out)
    assert figures["layers"] == config().num_hidden_layers and figures["results"][0]["format"] == "bf16"
    assert "bench_loading: " in err


def test_in_memory_conversion_names_missing_experts(saved):
    """`from_hf_state_dict` (a resume's reader) refuses expert indices with a gap by name, as the
    streamed load does, rather than a KeyError."""
    from nanoseek.checkpoint import to_hf_state_dict

    _, model = saved
    tensors = {k: v for k, v in to_hf_state_dict(model).items() if ".experts.1." not in k}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts: expert indices are not 0\.\.6"):
        from_hf_state_dict(tensors, model.config, torch.float32)


def test_an_expert_of_another_shape(saved):
    from safetensors.torch import load_file, save_file

    d, _ = saved
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    shard = d / json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=r"experts\.2: its gate/up/down projections .* differ in shape"):
        nanoseek.load_model(d)


def test_in_memory_conversion_of_a_tied_model_drops_a_stored_head(saved):
    """With tied embeddings the head is the embedding: a file's own lm_head.weight (some tools write
    it) is dropped by `from_hf_state_dict` too, so that loading it cannot overwrite the embedding."""
    from nanoseek.checkpoint import to_hf_state_dict

    model = build_model(config(tie_word_embeddings=True)).init_weights(0)
    tensors = to_hf_state_dict(model)
    tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])
    out = from_hf_state_dict(tensors, model.config, torch.float32)
    assert "lm_head.weight" not in out
    assert torch.equal(out["model.embed_tokens.weight"], model.model.embed_tokens.weight)


def test_the_reader_reopens_a_file_past_remap_bytes(saved, monkeypatch):
    """Pages of a memory-mapped file stay resident until it is closed: `_ShardReader` reopens a file
    once more than remap_bytes of it were read, bounding what a load keeps mapped."""
    from nanoseek import checkpoint

    d, _ = saved
    where = checkpoint._weight_files(d)
    path = max(set(where.values()), key=lambda p: sum(v == p for v in where.values()))
    keys = [k for k, v in where.items() if v == path]
    opened = []
    real = checkpoint._open_safetensors
    monkeypatch.setattr(checkpoint, "_open_safetensors", lambda p: opened.append(p) or real(p))
    reader = checkpoint._ShardReader(where, remap_bytes=0)
    for k in keys:
        reader.get(k)
    reader.close()
    assert len(opened) == len(keys) > 1


def test_experts_all_missing_the_same_projection(saved):
    """Every expert of a layer without its down_proj (a file cut to gate/up) is named as incomplete,
    not a KeyError from comparing them with expert 0."""
    d, _ = saved
    index = json.loads((d / "model.safetensors.index.json").read_text())
    gone = [
        k for k in index["weight_map"] if ".layers.1.mlp.experts." in k and k.endswith("down_proj.weight")
    ]
    drop_tensors(d, gone)
    with pytest.raises(ValueError, match=r"experts\.0: its gate/up/down projections .* incomplete"):
        nanoseek.load_model(d)


def test_streamed_load_names_missing_experts(saved):
    """A file without one expert (all its projections) is refused by name, as `from_hf_state_dict`
    refuses it, rather than a KeyError."""
    d, _ = saved
    index = json.loads((d / "model.safetensors.index.json").read_text())
    gone = [k for k in index["weight_map"] if ".layers.1.mlp.experts.1." in k]
    drop_tensors(d, gone)
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.experts: expert indices in .* are not 0\.\.6"
    ):
        nanoseek.load_model(d)


def drop_tensors(d, keys) -> None:
    """Remove `keys` from sharded checkpoint `d`: from their shards and from the index."""
    from safetensors.torch import load_file, save_file

    index = json.loads((d / "model.safetensors.index.json").read_text())
    for shard in {index["weight_map"][k] for k in keys}:
        tensors = load_file(str(d / shard))
        save_file({k: v for k, v in tensors.items() if k not in keys}, str(d / shard))
    for k in keys:
        del index["weight_map"][k]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def test_a_weight_whose_header_says_integers_is_named_not_loaded(saved, capsys, micro_checkpoint):
    """A header edited (or damaged) to say I32 where the bytes are F32: the streamed load failed deep in
    torch ("Only Tensors of floating point ... can require gradients"), and a resume's in-memory read
    took the bytes as integers."""
    import struct

    d, _ = saved
    shard = sorted(d.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    key = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    header[key]["dtype"] = "I32"  # the same width: safetensors' own size check passes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    for load in (nanoseek.load_model, read_safetensors):
        with pytest.raises(ValueError, match=rf"{key} in .*{shard.name} is stored as I32"):
            load(d)
    with_tokenizer(d, micro_checkpoint)
    assert "not a floating-point dtype" in one_line_error(capsys, d)


def test_a_checkpoint_in_another_quantization_is_named_not_called_damaged(tmp_path, capsys, micro_checkpoint):
    """A GPTQ (or AWQ, bitsandbytes) release of a DeepSeek model: config.json's quantization_config names
    its method and the files hold packed integers (qweight, qzeros, g_idx). The load said the header was
    "damaged or edited: fetch the checkpoint again", a download that changes nothing."""
    from safetensors.torch import save_file

    d = save_model(build_model(config(num_nextn_predict_layers=0)).init_weights(0), tmp_path / "gptq")
    layout = json.loads((d / "config.json").read_text())
    layout["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (d / "config.json").write_text(json.dumps(layout))
    tensors = read_safetensors(d)
    for key in [k for k in tensors if k.endswith("o_proj.weight")]:
        out, inner = tensors.pop(key).shape
        prefix = key.removesuffix(".weight")
        tensors[f"{prefix}.qweight"] = torch.zeros(inner // 8, out, dtype=torch.int32)
        tensors[f"{prefix}.qzeros"] = torch.zeros(inner // 32, out // 8, dtype=torch.int32)
        tensors[f"{prefix}.scales"] = torch.ones(inner // 32, out, dtype=torch.float16)
        tensors[f"{prefix}.g_idx"] = torch.zeros(inner, dtype=torch.int32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="quant_method 'gptq'"):
        nanoseek.load_model(d)
    with_tokenizer(d, micro_checkpoint)
    assert "quant_method 'gptq'" in one_line_error(capsys, d)  # not "damaged: fetch it again"
    # DeepSeek's own FP8 layout is read, as is a higher-precision copy whose config.json still names it
    layout["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    save_model(build_model(config(num_nextn_predict_layers=0)).init_weights(0), d)
    (d / "config.json").write_text(json.dumps(layout))
    nanoseek.load_model(d)


def test_a_directory_in_place_of_model_safetensors(saved, tmp_path, capsys, micro_checkpoint):
    """safetensors' own error for it was an OSError naming no file ("No such device"), a traceback."""
    _, model = saved
    d = save_model(model, tmp_path / "one")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    with pytest.raises(
        ValueError, match=r"model\.safetensors is not a readable safetensors file: it is a dir"
    ):
        nanoseek.load_model(d)
    with_tokenizer(d, micro_checkpoint)
    assert "it is a directory" in one_line_error(capsys, d)


@pytest.mark.parametrize(
    ("text", "message"),
    [(b'{"weight_map": {"a": 1}}', "no weight_map"), (b"\xff{", "not valid JSON: 'utf-8' codec")],
)
def test_a_damaged_index_is_named(saved, text, message):
    """A weight_map of numbers failed in a path join; bytes that are no UTF-8 as a bare codec error."""
    d, _ = saved
    (d / "model.safetensors.index.json").write_bytes(text)
    with pytest.raises(ValueError, match=rf"model\.safetensors\.index\.json.*{message}"):
        nanoseek.load_model(d)


def test_exact_dtype_is_the_files_own_16_bit_one_where_every_weight_is_in_it(saved, tmp_path):
    """What `nanoseek export` loads in: a bf16 or fp16 checkpoint's own dtype (the balancing bias, fp32
    in any load, aside), fp32 for fp32 weights or a mix (fp32 weights rounded would not export exactly)."""
    from safetensors.torch import load_file, save_file

    from nanoseek.checkpoint import exact_dtype

    d, model = saved
    assert exact_dtype(d) == torch.float32
    for dtype in (torch.bfloat16, torch.float16):
        assert exact_dtype(save_model(model, tmp_path / str(dtype), dtype=dtype)) == dtype
    mixed = save_model(model, tmp_path / "mixed", dtype=torch.bfloat16)
    shard = mixed / "model.safetensors"
    tensors = load_file(shard)
    key = next(k for k in tensors if "e_score_correction_bias" not in k)
    save_file({**tensors, key: tensors[key].float()}, str(shard), metadata={"format": "pt"})
    assert exact_dtype(mixed) == torch.float32
    # two 16-bit dtypes: neither holds the other's values (whichever of them a set yields first)
    save_file({**tensors, key: tensors[key].half()}, str(shard), metadata={"format": "pt"})
    assert exact_dtype(mixed) == torch.float32


def test_in_memory_conversion_names_an_expert_missing_a_projection(saved):
    """`from_hf_state_dict` (a resume's reader) refuses an expert without one of its projections, or one
    of another shape, by name, as the streamed load does: a KeyError ('gate_proj') and torch.stack's
    "stack expects each tensor to be equal size" said neither which tensor nor which checkpoint."""
    from nanoseek.checkpoint import to_hf_state_dict

    _, model = saved
    tensors = to_hf_state_dict(model)
    del tensors["model.layers.1.mlp.experts.3.gate_proj.weight"]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.3: its gate/up/down projections"):
        from_hf_state_dict(tensors, model.config, torch.float32)
    tensors = to_hf_state_dict(model)
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    tensors[key] = tensors[key][:, :-1]
    with pytest.raises(ValueError, match=r"experts\.2: its gate/up/down projections .* differ in shape"):
        from_hf_state_dict(tensors, model.config, torch.float32)


# ------------------------------------------------------------------ properties (hypothesis)
@settings(max_examples=12)
@given(
    layers=st.integers(1, 3),
    dense=st.integers(0, 3),
    mtp=st.integers(0, 1),
    tied=st.booleans(),
    max_shard_bytes=st.integers(2_000, 400_000),
    fault=st.sampled_from(["missing", "unexpected", "shape", "integers"]),
    pick=st.integers(0, 10_000),
    streamed=st.booleans(),
)
def test_a_checkpoint_missing_adding_or_mis_shaping_any_tensor_is_refused_naming_it(
    tmp_path_factory, layers, dense, mtp, tied, max_shard_bytes, fault, pick, streamed
):
    """Any one tensor of a saved checkpoint removed, one added, one of another shape or stored as
    integers: load_model and a resume's reader (`from_hf_state_dict` + `check_keys`) refuse it with a
    ValueError naming it (by nanoseek's name; a routed expert's by its stacked weight)."""
    import re

    from safetensors.torch import load_file, save_file

    from nanoseek.checkpoint import _model_name

    cfg = config(
        num_hidden_layers=layers, first_k_dense_replace=min(dense, layers), num_nextn_predict_layers=mtp
    )
    cfg = cfg.replace(tie_word_embeddings=tied)
    model = build_model(cfg).init_weights(0)
    d = save_model(model, tmp_path_factory.mktemp("ckpt"), max_shard_bytes=max_shard_bytes)
    index = d / "model.safetensors.index.json"
    files = sorted(d.glob("*.safetensors"))
    shard = files[pick % len(files)]
    tensors = load_file(str(shard))
    key = sorted(tensors)[pick % len(tensors)]
    # DeepSeek's MTP copies of the embedding and head are not read (the main ones are the model's)
    assume(_model_name(key, cfg, (1,)) is not None)
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    if fault == "missing":
        del tensors[key]
        if weight_map:
            del weight_map[key]
    elif fault == "unexpected":
        key = f"model.layers.{pick % layers}.self_attn.extra_proj.weight"
        tensors[key] = torch.zeros(3, 3)
        if weight_map:
            weight_map[key] = shard.name
    elif fault == "shape":
        tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
    else:
        tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, str(shard))
    if weight_map:
        index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError) as refused:
        if streamed:
            nanoseek.load_model(d)
        else:
            read = from_hf_state_dict(read_safetensors(d), cfg, torch.float32)
            check_keys(build_model(cfg, device="meta"), read, f"checkpoint {d}")
    name, message = _model_name(key, cfg, (1,)), str(refused.value)
    expert = re.match(r"(.*\.mlp\.experts)\.\d+\.", name)
    assert key in message or (expert[1] if expert else name) in message, message
