"""Shared test setup: deterministic, one intra-op thread per pytest-xdist worker (a worker per CPU).

Test models are tiny: a second thread buys little, and with several processes (the 2-rank distributed
tests, the server in its own process) spinning OpenMP threads on 2 cores it costs 10-50x.
"""

import os

# Before torch loads OpenMP: idle threads sleep instead of spinning on the shared cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(1)

# Property tests draw the same cases on every run and every machine (a failure found once is found again,
# never by luck in one CI run), write no example database into the tree, and take no deadline: these
# shared 2-core machines are too noisy for one. `HYPOTHESIS_PROFILE=explore` draws fresh cases, more.
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("explore", max_examples=2000, deadline=None, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): a worker per CPU this process may use (its cgroup's quota counted,
    as `nanoseek` counts it for torch's threads; xdist counts the host's), each on the one thread set
    above, at most 8: every worker holds torch and its session's fixtures."""
    from nanoseek.perf import usable_cpus

    return min(usable_cpus(), 8)


# The longest files first: a worker runs a whole file (`--dist loadfile`), and one of these handed out in
# name order would start late and keep a worker busy alone at the end of the run.
LONGEST_FIRST = ("test_speedrun.py", "test_learning_curve.py", "test_ablate.py", "test_pretrain.py")


def pytest_collection_modifyitems(config, items) -> None:
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory) -> str:
    """A very small DeepSeek-V3 (MLA + MoE) checkpoint with a BPE tokenizer trained on task texts."""
    from nanoseek.checkpoint import build_model, save_model
    from nanoseek.config import get_preset
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import train_tokenizer

    task = get_task("arithmetic")
    texts = [p.prompt + task.worked_solution(p) for p in task.problems("train", 200, seed=3)]
    tok = train_tokenizer(texts, vocab_size=400)
    cfg = get_preset("tiny").replace(
        vocab_size=tok.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        num_nextn_predict_layers=0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    d = tmp_path_factory.mktemp("micro") / "init"
    save_model(build_model(cfg).init_weights(0), d)
    tok.save(d)
    return str(d)


@pytest.fixture
def narrow_checkpoint(micro_checkpoint, tmp_path) -> str:
    """The micro checkpoint's tokenizer beside a model with 64 rows fewer than it has tokens: another
    model's tokenizer.json, or a config.json edited down."""
    import shutil

    from nanoseek.checkpoint import build_model, save_model
    from nanoseek.config import ModelConfig

    d = tmp_path / "narrow"
    config = ModelConfig.load(micro_checkpoint)
    save_model(build_model(config.replace(vocab_size=config.vocab_size - 64)).init_weights(0), d)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{micro_checkpoint}/{name}", d / name)
    return str(d)


@pytest.fixture
def nan_losses(monkeypatch) -> None:
    """Every training step's loss NaN, and two skipped steps in a row end the run (`TrainingDiverged`
    naming optimizer steps 1-2), whatever the stage's own limit."""
    import math

    from nanoseek.train import loop

    step = loop.Trainer.step

    def nan_step(self, loss_fn, accumulation=1):
        self.max_consecutive_skips = 2

        def fn():
            loss, m = loss_fn()
            return loss * math.nan, m

        return step(self, fn, accumulation)

    monkeypatch.setattr(loop.Trainer, "step", nan_step)
