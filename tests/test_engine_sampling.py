"""The sampler (filters, penalties, seeds, stops, logprobs) and weight-only quantization."""

from __future__ import annotations

import copy
import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tests.test_engine import PROMPTS, examples, small_config

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.quantize import QuantLinear, is_quantized, quantize_model, weight_bytes
from nanoseek.engine.sampling import (
    SORT_HEAD,
    SamplerState,
    apply_penalties,
    processed_probs,
    sample,
    token_logprobs,
)
from nanoseek.model.transformer import DeepSeekV3


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model() -> DeepSeekV3:
    cfg = small_config()
    cfg.extra["initializer_range"] = 0.1
    return DeepSeekV3(cfg).init_weights(seed=1).eval()


def test_filters_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]]))
    p = processed_probs(logits, [SamplingParams(temperature=1.0, top_k=2)])
    assert torch.allclose(p, torch.tensor([[2 / 3, 1 / 3, 0, 0, 0]]))
    p = processed_probs(logits, [SamplingParams(temperature=1.0, top_p=0.7)])  # 0.5 + 0.25 reaches 0.7
    assert torch.allclose(p, torch.tensor([[2 / 3, 1 / 3, 0, 0, 0]]))
    p = processed_probs(logits, [SamplingParams(temperature=1.0, min_p=0.2)])  # keep p >= 0.1
    assert torch.allclose(p, torch.tensor([[0.5, 0.25, 0.15, 0, 0]]) / 0.9)
    p = processed_probs(logits, [SamplingParams(temperature=0.5)])
    want = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]) ** 2
    assert torch.allclose(p[0], want / want.sum())


def _reference_filter(logits, top_k, top_p):
    """Top-k then top-p over the fully sorted vocabulary, row by row: what the filter must equal."""
    out = torch.full_like(logits, float("-inf"))
    for r in range(logits.shape[0]):
        vals, order = logits[r].sort(descending=True)
        k = min(int(top_k[r]), logits.shape[1])
        k = int((vals >= vals[k - 1]).sum())  # tokens tied with the k-th stay (transformers, vLLM)
        probs = vals[:k].softmax(-1)
        before = probs.cumsum(-1) - probs
        keep = k if top_p[r] >= 1 else max(1, int((before < top_p[r]).sum()))
        out[r, order[:keep]] = vals[:keep]
    return out


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked rows (kept set in the head), flat ones (fallback)
def test_the_ranked_head_filters_as_a_full_sort_does(scale, monkeypatch):
    import nanoseek.engine.sampling as sampling
    from nanoseek.engine.sampling import SORT_HEAD

    heads = []
    real = sampling._top_k_top_p

    def _top_k_top_p(logits, top_k, top_p, head=SORT_HEAD):
        heads.append(head)
        return real(logits, top_k, top_p, head)

    monkeypatch.setattr(sampling, "_top_k_top_p", _top_k_top_p)
    torch.manual_seed(0)
    v = 4 * SORT_HEAD
    logits = torch.randn(6, v) * scale
    top_k = torch.tensor([v, v, 5, SORT_HEAD, v, 2 * SORT_HEAD])
    top_p = torch.tensor([0.95, 1.0, 0.9, 0.5, 0.3, 1.0])
    for rows in ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]):  # the last row's top-k reaches past the head
        got = _top_k_top_p(logits[rows], top_k[rows], top_p[rows])
        want = _reference_filter(logits[rows], top_k[rows], top_p[rows])
        assert torch.equal(got.isfinite(), want.isfinite())
        assert torch.equal(got[got.isfinite()], want[want.isfinite()])
    # peaked rows are filtered from their head alone; a long top-k or a flat row takes the full sort
    full = 4 * SORT_HEAD
    assert heads == ([SORT_HEAD, SORT_HEAD, full] if scale > 1 else [SORT_HEAD, full, SORT_HEAD, full])


def test_top_k_keeps_the_tokens_tied_with_the_kth_as_transformers_does():
    from transformers.generation.logits_process import TopKLogitsWarper

    from nanoseek.engine.sampling import SORT_HEAD

    # top_k = 1 over two tied best tokens samples either (it kept token 1 alone, token 2 never drawn); a tie
    # that runs past the ranked head keeps all of it too
    tied = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    wide = torch.cat([torch.zeros(1, 2 * SORT_HEAD), torch.full((1, 2 * SORT_HEAD), -1.0)], dim=1)
    head = torch.cat([torch.tensor([[5.0, 3.0, 3.0, 3.0]]), torch.full((1, 4 * SORT_HEAD), -1.0)], dim=1)
    for logits, k in ((tied, 1), (tied, 2), (wide, 3), (wide, 2 * SORT_HEAD + 1), (head, 2)):
        got = processed_probs(logits, [SamplingParams(temperature=1.0, top_k=k)])
        want = TopKLogitsWarper(k)(None, logits.clone()).softmax(-1)
        assert torch.allclose(got, want), (logits.shape, k)
    assert processed_probs(tied, [SamplingParams(temperature=1.0, top_k=1)]).tolist() == [[0, 0.5, 0.5, 0]]


def test_a_top_p_cut_through_tied_tokens_keeps_the_first_alone_or_batched_as_greedy_does():
    """Which of tied tokens a top-p cut kept went by topk's order of ties, which the ranked head's topk and
    the vocabulary's give otherwise: a seeded request drew another token once a batch mate's top-k sent the
    batch to the full sort, and a top-p near 0 drew another token than greedy's first maximum."""
    from nanoseek.engine.sampling import SORT_HEAD

    v = 4 * SORT_HEAD
    # a top-k past the ranked head: the whole batch sorts the vocabulary
    mate = SamplingParams(temperature=1.0, top_k=SORT_HEAD + 1)
    for first, second in ((3, 70), (72, 96)):
        logits = -torch.arange(v, dtype=torch.float32) / v
        logits[[first, second]] = 5.0  # the best two, tied, 0.4 each: a top-p of 0.1 keeps one of them
        logits = logits.repeat(2, 1)
        greedy = sample(logits[:1], [SamplerState(SamplingParams(), [0], v)]).item()
        for params in (
            SamplingParams(temperature=1.0, top_p=0.1),
            SamplingParams(temperature=1.0, top_k=5, top_p=0.1),
        ):
            alone = sample(logits[:1], [SamplerState(params, [0], v)]).item()
            batched = sample(logits, [SamplerState(p, [0], v) for p in (params, mate)])[0].item()
            assert alone == batched == greedy == first, (first, params)
    # a tie that runs past the ranked head: the cut keeps its lowest ids, as a full sort by id does
    logits = torch.cat([torch.full((1, 2 * SORT_HEAD), -1.0), torch.zeros(1, 2 * SORT_HEAD)], dim=1)
    got = processed_probs(logits, [SamplingParams(temperature=1.0, top_p=0.1)])
    kept = got[0].nonzero().flatten().tolist()  # 9 of the 64 tied tokens make up 0.1
    assert kept == list(range(2 * SORT_HEAD, 2 * SORT_HEAD + 9))


def test_a_batch_mates_min_p_leaves_a_rows_probabilities_as_they_are_alone():
    # every row was renormalised once any asked for min_p: a rounding's move in the probabilities a seeded
    # request draws from, with its batch mates
    torch.manual_seed(0)
    logits = torch.randn(9, 1000)
    mine = [SamplingParams(temperature=t, top_p=p) for t in (0.7, 1.0) for p in (1.0, 0.9)] * 2
    batched = processed_probs(logits, [*mine, SamplingParams(temperature=1.0, min_p=0.05)])
    for i, params in enumerate(mine):
        assert torch.equal(batched[i], processed_probs(logits[i : i + 1], [params])[0]), params


def test_the_tie_check_reads_the_vocabulary_only_where_the_head_ends_in_a_tie():
    """A tie with the k-th logit can reach past the ranked head only where the head's last logit ties it.
    Counting the ties over the whole vocabulary at every decode step, for every row (top-p-only rows
    too, R1's T = 0.6 and top-p 0.95, whose count was thrown away), made sampling slower for nothing."""
    from torch.overrides import TorchFunctionMode

    from nanoseek.engine.sampling import SORT_HEAD, _top_k_top_p

    v = 4 * SORT_HEAD

    class VocabularyCompares(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            compare = getattr(func, "__name__", "") in ("ge", "__ge__")
            if compare and isinstance(args[0], torch.Tensor) and args[0].ndim == 2 and args[0].shape[1] == v:
                VocabularyCompares.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    logits = torch.randn(3, v)
    logits[:, :4] += 10  # peaked, as a trained model's: the kept sets lie in the head
    top_k, top_p = torch.tensor([v, 5, 2]), torch.tensor([0.95, 1.0, 0.9])
    with VocabularyCompares():
        got = _top_k_top_p(logits, top_k, top_p)
    assert VocabularyCompares.n == 0
    want = _reference_filter(logits, top_k, top_p)
    assert torch.equal(got.isfinite(), want.isfinite())


def test_the_top_p_tie_check_reads_the_device_with_the_head_check():
    """The check for a top-p cut through ties at the head's end read the device on its own: one host sync
    more at every sampled step (R1's top-p 0.95 rows), where a GPU waits for each. It is read with the
    check that a kept set reaches past the head: three reads in all, as before it."""
    from torch.overrides import TorchFunctionMode

    from nanoseek.engine.sampling import SORT_HEAD, _top_k_top_p

    class HostReads(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            HostReads.n += getattr(func, "__name__", "") in ("__bool__", "item", "tolist")
            return func(*args, **(kwargs or {}))

    v = 4 * SORT_HEAD
    torch.manual_seed(0)
    logits = torch.randn(3, v)
    logits[:, :4] += 10  # peaked, as a trained model's: the kept sets lie in the head
    top_k, top_p = torch.tensor([v, 5, v]), torch.tensor([0.95, 0.9, 0.5])
    with HostReads():
        got = _top_k_top_p(logits, top_k, top_p)
    assert HostReads.n == 3
    want = _reference_filter(logits, top_k, top_p)
    assert torch.equal(got.isfinite(), want.isfinite())


def test_penalties():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    st = SamplerState(SamplingParams(repetition_penalty=2.0), prompt_ids=[0], vocab_size=4)
    st.observe(1)
    assert torch.allclose(apply_penalties(logits, [st]), torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    st = SamplerState(
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[0], vocab_size=4
    )
    for t in (3, 3, 2):
        st.observe(t)
    # Prompt tokens are not penalized by presence/frequency; output counts are.
    assert torch.allclose(apply_penalties(logits, [st]), torch.tensor([[2.0, -1.0, -0.25, 2.0]]))


def test_top_p_and_min_p_boundaries_are_transformers():
    # exact binary probabilities: the mass before token 2 equals top_p, which drops it (HF's and vLLM's
    # `cumsum ascending <= 1 - top_p`); min_p = 1 keeps the top token only, and both are in range
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    p = processed_probs(logits, [SamplingParams(temperature=1.0, top_p=0.75)])
    assert torch.allclose(p, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))
    SamplingParams(min_p=1.0).validate()
    p = processed_probs(logits, [SamplingParams(temperature=1.0, min_p=1.0)])
    assert p.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0.0).validate()


@pytest.mark.parametrize(
    ("name", "value", "want"),
    [
        ("presence_penalty", 0.5, [2.0, -1.0, 0.0, 2.5]),
        ("frequency_penalty", 0.5, [2.0, -1.0, 0.0, 2.0]),
        ("repetition_penalty", 2.0, [1.0, -1.0, 0.25, 1.5]),
    ],
)
def test_each_penalty_applies_on_its_own(name, value, want):
    # the token seen twice and the one seen once in the output; token 0 is the prompt's
    st = SamplerState(SamplingParams(**{name: value}), prompt_ids=[0], vocab_size=4)
    for t in (3, 3, 2):
        st.observe(t)
    assert torch.allclose(apply_penalties(torch.tensor([[2.0, -1.0, 0.5, 3.0]]), [st]), torch.tensor([want]))


def test_each_row_gets_its_own_number_of_top_logprobs():
    logits = torch.randn(3, 10)
    got = token_logprobs(logits, torch.tensor([0, 1, 2]), [1, 3, 0])
    assert [len(lp.top) for lp in got] == [1, 3, 0]


def test_seed_zero_is_a_seed():
    logits = torch.zeros(1, 1000)
    draws = [
        sample(logits, [SamplerState(SamplingParams(temperature=1.0, seed=0), [0], 1000)]) for _ in range(3)
    ]
    assert draws[0] == draws[1] == draws[2]


def test_a_negative_seed_is_a_seed_of_its_own():
    # Python's Random took -s as s: seed -1 with n = 3 (seeds -1, 0, 1) gave choices 0 and 2 the same tokens
    logits = torch.zeros(1, 1000)
    seeds = (-1, 0, 1, -2, 2, -(2**63), 2**63 - 1)  # vLLM's int64 range, each end

    def tokens(seed: int) -> list[int]:
        st = SamplerState(SamplingParams(temperature=1.0, seed=seed), [0], 1000)
        return [int(sample(logits, [st])) for _ in range(4)]

    draws = [tokens(s) for s in seeds]
    assert len({tuple(d) for d in draws}) == len(seeds)
    assert draws == [tokens(s) for s in seeds]  # each still reproducible


def test_logit_bias():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    plain = SamplerState(SamplingParams(), prompt_ids=[0], vocab_size=4)
    biased = SamplerState(SamplingParams(logit_bias={3: -100.0, 1: 2.5}), prompt_ids=[0], vocab_size=4)
    # only the row that asks is biased, greedy rows included; a batch of mixed rows keeps each its own
    assert torch.allclose(apply_penalties(logits, [plain, biased])[1], torch.tensor([2.0, 1.5, 0.5, -97.0]))
    assert sample(logits, [plain, biased]).tolist() == [3, 0]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SamplerState(SamplingParams(logit_bias={4: 1.0}), prompt_ids=[0], vocab_size=4)
    with pytest.raises(ValueError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias={0: 150.0}).validate()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logprobs", True),  # OpenAI chat's boolean: torch.topk refused it mid-step
        ("logprobs", 1.5),
        ("stop_token_ids", 5),  # one id, not a list: `token in 5` failed the request mid-step
        ("stop_token_ids", "5"),
        ("logit_bias", {"5": 1.0}),  # OpenAI's JSON keys are strings: a TypeError from the sampler
        ("top_k", 20.0),  # a float: every sampled step failed with gather()'s dtype error
        ("top_k", 2.5),
    ],
)
def test_token_ids_of_the_wrong_type_are_refused_up_front(model, field, value):
    with pytest.raises(ValueError, match=f"invalid SamplingParams: {field}"):
        SamplingParams(**{field: value}).validate()
    with pytest.raises(ValueError, match=field):
        Engine(model).generate([PROMPTS[0]], max_new_tokens=2, **{field: value})
    SamplingParams(logprobs=2, stop_token_ids=(torch.tensor(5), 6), logit_bias={5: 1.0}).validate()


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("max_new_tokens", 2.5, "an int"),  # generated 3 tokens without a word
        ("max_new_tokens", "8", "an int"),
        ("temperature", "0.7", "a number"),  # a bare TypeError from a comparison in validate
        ("top_p", None, "a number"),
        ("repetition_penalty", "1.1", "a number"),
        ("seed", "1", "None or an int"),  # a TypeError from inside the sampler, mid-step
        ("seed", 1.5, "None or an int"),
    ],
)
def test_sampling_numbers_of_the_wrong_type_are_refused_naming_the_field(field, value, says):
    with pytest.raises(ValueError, match=f"invalid SamplingParams: {field} must be {says}"):
        SamplingParams(**{field: value}).validate()
    SamplingParams(
        max_new_tokens=torch.tensor(3), temperature=1, top_p=np.float32(0.9), seed=np.int64(1)
    ).validate()


def test_a_seed_of_any_integer_type_that_validate_accepts_seeds_as_its_int():
    """`validate` accepts numpy's and 0-d tensors' integers as seeds, but random.Random refused them: a
    TypeError from add_request (numpy's int64(-2): an OverflowError) instead of the int's stream."""
    logits = torch.zeros(1, 1000)

    def tokens(seed) -> list[int]:
        st = SamplerState(SamplingParams(temperature=1.0, seed=seed), [0], 1000)
        return [int(sample(logits, [st])) for _ in range(4)]

    for seed in (np.int64(3), np.int32(3), torch.tensor(3), np.int64(-2)):
        assert tokens(seed) == tokens(int(seed)), seed


def test_a_numpy_or_fraction_number_validate_accepts_is_sampled_as_its_float_and_fails_no_batch_mate():
    """Every real `validate` accepts is a sampling number: a numpy float64 penalty (a sweep's
    np.linspace) made the penalized logits float64 ("Index put requires the source and destination
    dtypes match"), a Fraction failed torch.tensor, both in the middle of a step, failing every request
    sampled in that step."""
    logits = torch.randn(2, 50)
    mate = SamplingParams(temperature=1.0, seed=1)
    for field, value in [
        ("temperature", Fraction(1, 2)),
        ("top_p", Fraction(1, 2)),
        ("min_p", Fraction(1, 10)),
        ("repetition_penalty", Fraction(3, 2)),
        ("presence_penalty", Fraction(1, 2)),
        ("frequency_penalty", Fraction(-1, 2)),
        ("repetition_penalty", np.float64(1.5)),
        ("presence_penalty", np.float64(0.5)),
        ("frequency_penalty", np.float64(0.5)),
        ("temperature", np.float64(0.7)),
    ]:
        for temperature in (0.0, 1.0):  # greedy rows take the penalties too
            fields = {"temperature": temperature, "seed": 2}
            params = [SamplingParams(**{**fields, field: v}) for v in (value, float(value))]
            for p in params:
                p.validate()
            exact, rounded = (
                sample(logits, [SamplerState(p, [0], 50), SamplerState(mate, [0], 50)]) for p in params
            )
            assert exact.tolist() == rounded.tolist(), (field, value)
    # nor moves a batch mate: a numpy float64 temperature turned the whole batch's logits float64, so a
    # seeded row drew from other probabilities than alone (processed_probs reads the sampler states' params)
    mine = SamplerState(SamplingParams(temperature=0.7, top_p=0.9), [0], 50).params
    mate = SamplerState(SamplingParams(temperature=np.float64(0.7)), [0], 50).params
    batched = processed_probs(logits, [mine, mate])[0]
    assert torch.equal(batched, processed_probs(logits[:1], [mine])[0])


def test_logit_bias_values_of_any_real_type_are_biases_and_others_are_refused_naming_the_field():
    # a string value failed validate's range check with a bare TypeError; a numpy float failed add_request
    # ("can't assign a numpy.float32 to a torch.FloatTensor")
    for value in ("2", None, [1.0]):
        with pytest.raises(ValueError, match="invalid SamplingParams: logit_bias values"):
            SamplingParams(logit_bias={1: value}).validate()
    for value in (np.float32(2.5), np.float64(2.5), Fraction(5, 2)):
        SamplingParams(logit_bias={1: value}).validate()
        st = SamplerState(SamplingParams(logit_bias={1: value}), [0], 4)
        assert apply_penalties(torch.zeros(1, 4), [st]).tolist() == [[0.0, 2.5, 0.0, 0.0]]


@pytest.mark.parametrize("value", [2.5, -3.0, float("inf"), float("nan")])
@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_presence_and_frequency_penalties_outside_openais_range_are_refused(name, value):
    # NaN or inf turned every logit into NaN: greedy picked token 0 at every step, without a word
    with pytest.raises(ValueError, match=rf"{name} must be in \[-2, 2\]"):
        SamplingParams(**{name: value}).validate()
    SamplingParams(**{name: -2.0}).validate()
    SamplingParams(**{name: 2.0}).validate()


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0])
def test_a_temperature_that_is_not_a_finite_number_is_refused(value):
    # `generate --temperature inf` passed the >= 0 check: logits / inf are all 0, and every token was
    # drawn from the whole vocabulary alike, without a word
    with pytest.raises(ValueError, match="temperature must be >= 0 and finite"):
        SamplingParams(temperature=value).validate()
    SamplingParams(temperature=1e30).validate()


@pytest.mark.parametrize("value", [1e-50, 1e40, float("inf"), float("nan"), 0.0])
def test_a_repetition_penalty_fp32_cannot_hold_is_refused(value):
    # 1e-50 passed the > 0 check, rounded to 0 in the fp32 logits' division: inf logits, NaN
    # probabilities, and a sampled request emitted the vocabulary's last token at every step
    with pytest.raises(ValueError, match="repetition_penalty must be > 0 and within float32's range"):
        SamplingParams(repetition_penalty=value).validate()
    SamplingParams(repetition_penalty=1e-30).validate()
    SamplingParams(repetition_penalty=1e30).validate()


@pytest.mark.parametrize(("penalty", "temperature"), [(1e-40, 1.0), (1e-34, 2e-5)])
def test_a_penalty_that_overflows_the_logits_samples_the_tokens_it_favours(penalty, temperature):
    # 1e-40 is a float32 subnormal (> 0, so `validate` takes it) and 1e-34 overflows once divided by a small
    # temperature: the seen tokens' logits became +inf, the probabilities NaN, and the vocabulary's last
    # token (never seen, a negative logit) was drawn at every step
    SamplingParams(repetition_penalty=penalty, temperature=temperature).validate()
    logits = torch.tensor([[30.0, 20.0, -1.0, 25.0, -2.0]])
    drawn = set()
    for seed in range(20):
        params = SamplingParams(repetition_penalty=penalty, temperature=temperature, seed=seed)
        drawn |= set(sample(logits, [SamplerState(params, prompt_ids=[0, 3, 4], vocab_size=5)]).tolist())
    assert drawn <= {0, 3}


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_a_rejected_draft_is_redrawn_on_the_logits_device(device):
    """Speculative sampling's residual draw made its uniform on the default device: with logits on a
    GPU every rejected draft raised (searchsorted over a cuda CDF with a cpu value). The default device
    is set elsewhere here (meta) to show the same on a machine without one."""
    from nanoseek.engine.speculative import verify

    p = torch.tensor([0.3, 0.5, 0.2])
    n = 2000
    logits = p.log().repeat(n, 1).to(device)
    drafts = torch.zeros(n, dtype=torch.long, device=device)
    states = [SamplerState(SamplingParams(temperature=1.0, seed=s), [1], 3) for s in range(n)]
    with torch.device("meta"):
        accepted, tokens = verify(logits, drafts, states)
    assert accepted.device.type == tokens.device.type == torch.device(device).type
    # accepted with p(d); otherwise drawn from p without d: the output is distributed as p
    freq = torch.bincount(tokens.cpu(), minlength=3).float() / n
    assert torch.allclose(freq, p, atol=0.05) and bool((tokens[~accepted] != 0).all())


class _FakeMPS(torch.overrides.TorchFunctionMode):
    """CPU tensors that say they are on an Apple GPU (mps), which refuses float64 and float8 as MPS does."""

    def __init__(self) -> None:
        super().__init__()
        self.on: list[torch.Tensor] = []  # the tensors "on mps"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        mps = [a for a in args if isinstance(a, torch.Tensor) and any(a is t for t in self.on)]
        if getattr(func, "__self__", None) is torch.Tensor.device and mps:
            return torch.device("mps")
        asked = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        to_mps = asked is not None and torch.device(asked).type == "mps"
        if to_mps:  # made on the CPU, marked as on mps
            args = tuple("cpu" if a is asked else a for a in args)
            kwargs.update({"device": "cpu"} if "device" in kwargs else {})
        out = func(*args, **kwargs)
        if func is torch.Tensor.cpu and mps:
            return out.clone()  # (a CPU tensor's .cpu() is itself)
        if isinstance(out, torch.Tensor) and (to_mps or (mps and asked is None)):
            if out.dtype in (torch.float64, torch.float8_e4m3fn):  # (float8: before PyTorch gave MPS one)
                raise TypeError(f"Trying to convert {out.dtype} to the MPS backend: it has no such dtype")
            out = out.clone() if any(out is a for a in args) else out
            self.on.append(out)
        return out


def test_a_sampled_token_on_an_apple_gpu_is_drawn_as_on_the_cpu():
    """The draw's CDF is float64, which MPS does not have: `--device mps` raised a TypeError at the first
    sampled token of every generate, chat, serve and eval. (MPS emulated on the CPU: `_FakeMPS`.)"""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))

    def states():
        return [SamplerState(SamplingParams(temperature=0.8, top_p=0.9, seed=s), [1], 50) for s in range(3)]

    want = sample(logits, states())
    with _FakeMPS():
        got = sample(logits.to("mps"), states())
        assert got.device.type == "mps"
    assert torch.equal(got, want)


def test_fp8_weights_on_an_apple_gpu_without_float8_are_refused_before_loading():
    """`--quantize fp8 --device mps` ended in a TypeError traceback at the first weight quantized
    (after the checkpoint began streaming in): refused up front, naming int8, which runs there."""
    from nanoseek.engine.quantize import check_quantize_device

    with _FakeMPS():
        with pytest.raises(ValueError, match="no float8 on mps.*quantize='int8'"):
            check_quantize_device("fp8", "mps")
        check_quantize_device("int8", "mps")


def test_a_sampled_draft_that_is_the_argmax_is_still_rejected_with_probability_1_minus_p():
    """The engine advances its cache past the draft only for accepted rows: a rejected draft must be
    reported rejected even when it is the greedy choice (accept with p(d) = 0.5 here, not always)."""
    from nanoseek.engine.speculative import verify

    p = torch.tensor([0.5, 0.3, 0.2])
    n = 2000
    states = [SamplerState(SamplingParams(temperature=1.0, seed=s), [1], 3) for s in range(n)]
    accepted, tokens = verify(p.log().repeat(n, 1), torch.zeros(n, dtype=torch.long), states)
    assert abs(accepted.float().mean().item() - 0.5) < 0.05
    assert bool((tokens[accepted] == 0).all()) and bool((tokens[~accepted] != 0).all())
    freq = torch.bincount(tokens, minlength=3).float() / n
    assert torch.allclose(freq, p, atol=0.05)


def test_sampling_matches_distribution():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1])).repeat(4000, 1)
    st = SamplerState(SamplingParams(temperature=1.0, seed=0), [0], 3)
    counts = torch.bincount(sample(logits, [st] * 4000), minlength=3).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_seed_is_reproducible_and_batch_independent(model):
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=123)
    alone = Engine(model).generate_detailed([PROMPTS[0]], p)[0].token_ids
    engine = Engine(model, max_batch_size=4)
    others = [
        engine.add_request(x, SamplingParams(max_new_tokens=7, temperature=1.3, seed=i))
        for i, x in enumerate(PROMPTS[1:])
    ]
    rid = engine.add_request(PROMPTS[0], p)
    got: dict[str, list[int]] = {r: [] for r in others + [rid]}
    while engine.has_unfinished():
        for ev in engine.step():
            got[ev.request_id].extend(ev.new_token_ids)
    assert got[rid] == alone
    different = Engine(model).generate([PROMPTS[0]], p, seed=124)[0]
    assert different != alone
    greedy = Engine(model).generate([PROMPTS[0]], max_new_tokens=10)[0]
    assert (
        Engine(model).generate([PROMPTS[0]], max_new_tokens=10, temperature=1.0, top_k=1, seed=7)[0] == greedy
    )


def test_one_sampling_params_per_prompt(model):
    one = SamplingParams(max_new_tokens=6, temperature=1.0, seed=40)
    each = [SamplingParams(max_new_tokens=4 + i, temperature=1.0, seed=40 + i, logprobs=0) for i in range(3)]
    got = Engine(model, max_batch_size=4).generate_detailed(PROMPTS[:3], each)
    for i, c in enumerate(got):
        assert c.token_ids == Engine(model).generate([PROMPTS[i]], each[i])[0] and len(c.logprobs) == 4 + i
    # one params for all: prompt i samples with seed + i, as the list above spells out
    assert Engine(model).generate(PROMPTS[:1], one)[0][:4] == got[0].token_ids
    # ... so a prompt repeated in one call samples apart, each as alone with its own seed
    batch = Engine(model, max_batch_size=4).generate([PROMPTS[0]] * 3, one)
    assert batch == [Engine(model).generate([PROMPTS[0]], one, seed=40 + i)[0] for i in range(3)]
    assert batch[0] != batch[1]
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        Engine(model).generate_detailed(PROMPTS[:3], each[:2])


def test_stop_tokens_logprobs_and_stream(model):
    engine = Engine(model)
    greedy = engine.generate([PROMPTS[0]], max_new_tokens=10)[0]
    stop = greedy[3]
    first = greedy.index(stop)
    (c,) = engine.generate_detailed([PROMPTS[0]], max_new_tokens=10, stop_token_ids=[stop], logprobs=3)
    assert c.token_ids == greedy[: first + 1] and c.finish_reason == "stop"
    for lp in c.logprobs:
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the top alternative
        assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:], strict=False))
        assert lp.logprob <= 0 and math.isclose(lp.logprob, lp.top[0][1], abs_tol=1e-6)
    # EOS from the model config stops generation unless ignore_eos.
    eos_model = copy.deepcopy(model)
    eos_model.config = eos_model.config.replace(eos_token_id=stop)
    assert Engine(eos_model).generate([PROMPTS[0]], max_new_tokens=10)[0] == greedy[: first + 1]
    assert Engine(eos_model).generate([PROMPTS[0]], max_new_tokens=10, ignore_eos=True)[0] == greedy
    events = list(engine.stream([PROMPTS[0], PROMPTS[1]], max_new_tokens=4))
    assert all(len(e.new_token_ids) == 1 for e in events)
    assert sum(e.finished for e in events) == 2 and all(e.logprobs is None for e in events)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "w8a8"])
def test_weight_only_quantization(model, fmt):
    q = quantize_model(copy.deepcopy(model), fmt)
    assert is_quantized(q) and any(isinstance(m, QuantLinear) for m in q.modules())
    assert isinstance(q.lm_head, QuantLinear) == (fmt != "fp8")  # as llama.cpp's Q8_0; FP8 widens per call
    assert weight_bytes(q) < 0.5 * weight_bytes(model)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        ref, got = model(ids).log_softmax(-1), q(ids).log_softmax(-1)
    # Per-channel 8-bit weights: next-token distributions stay close.
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    assert kl < 0.05
    assert torch.equal(q(ids).log_softmax(-1), got)  # called as README shows it, autograd recording
    engine = Engine(copy.deepcopy(model), quantize=fmt)
    out = engine.generate([PROMPTS[0]], max_new_tokens=6)[0]
    assert len(out) == 6
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(copy.deepcopy(model), "int4")


def test_a_model_already_in_another_8bit_storage_is_not_quantized_again(model):
    """Engine(quantize=...) over a model loaded with quantize= or fp8=True: the same format again is a
    no-op; another one quantized only what was left (the head, the experts) and said it had done
    it all (engine.quantize), a mix load_model(fp8=True, quantize=...) refuses."""
    from nanoseek.model.fp8 import quantize_linears_fp8

    int8 = quantize_model(copy.deepcopy(model), "int8")
    assert Engine(int8, quantize="int8").model is int8
    with pytest.raises(ValueError, match=r"quantize='fp8': .* already stored in int8"):
        Engine(int8, quantize="fp8")
    fp8 = copy.deepcopy(model)
    quantize_linears_fp8(fp8)
    with pytest.raises(ValueError, match=r"quantize='int8': .* already stored in fp8=True"):
        Engine(fp8, quantize="int8")


@pytest.mark.parametrize("fmt", ["int8", "w8a8"])
def test_an_engine_names_the_storage_its_model_loaded_in(model, fmt):
    """`serve` quantizes as the checkpoint loads (`load_model(quantize=...)`) and builds its Engine
    without quantize=: the engine said quantize=None, as for full-precision weights."""
    q = quantize_model(copy.deepcopy(model), fmt)
    engine = Engine(q)
    assert engine.quantize == fmt and f"quantize='{fmt}'" in repr(engine)
    assert Engine(copy.deepcopy(model)).quantize is None


def test_a_packed_model_is_refused_by_quantize_not_half_quantized(model, monkeypatch):
    """Engine(quantize=...) over a model an earlier Engine packed (pack_weights=True): packed routed
    experts failed with an AttributeError (no gate_up_proj), packed linears were left in full precision
    while the rest went 8-bit. Refused now, before any change; a head packed beside fp8 storage (which
    keeps the head in full precision) is no target, so the same Engine can be built again."""
    from nanoseek.engine import packed
    from nanoseek.engine.packed import PackedLinear, packable
    from nanoseek.model import moe

    monkeypatch.setattr(moe, "GATHER_LIMIT", 0)  # experts this small would gather, not pack
    monkeypatch.setattr(packed, "PACK_MIN_ELEMENTS", 0)
    if not packable(model):
        pytest.skip("this PyTorch's oneDNN does not pack these weights")
    m = copy.deepcopy(model)
    Engine(m, pack_weights=True)
    kinds = [type(x) for x in m.modules()]
    for fmt in ("int8", "fp8"):
        with pytest.raises(ValueError, match=rf"quantize='{fmt}': .* already packed"):
            Engine(m, quantize=fmt)
    assert [type(x) for x in m.modules()] == kinds
    fp8 = copy.deepcopy(model)
    Engine(fp8, quantize="fp8", pack_weights=True)
    assert isinstance(fp8.lm_head, PackedLinear)
    assert len(Engine(fp8, quantize="fp8").generate([PROMPTS[0]], max_new_tokens=3)[0]) == 3


@pytest.mark.parametrize("fmt", ["int8", "fp8", "w8a8"])
@pytest.mark.parametrize("tokens", [1, 3, 40])  # the int8 kernel's few rows, and widening per expert
def test_quantized_experts_run_on_their_storage(fmt, tokens, monkeypatch):
    """Quantized routed experts equal the same experts dequantized (a plain RoutedExperts), without
    ever widening every expert: the grouped GEMM reads each used expert's stored rows."""
    from nanoseek.engine.quantize import QuantRoutedExperts
    from nanoseek.model.moe import RoutedExperts

    torch.manual_seed(0)
    dense = RoutedExperts(8, 64, 32).to(torch.bfloat16)
    with torch.no_grad():
        dense.gate_up_proj.normal_(0, 0.2)
        dense.down_proj.normal_(0, 0.2)
    q = QuantRoutedExperts(dense, fmt)
    ref = RoutedExperts(8, 64, 32).to(torch.bfloat16)
    with torch.no_grad():
        gu, d = q.expert_weights()
        ref.gate_up_proj.copy_(gu)
        ref.down_proj.copy_(d)
    monkeypatch.setattr(QuantRoutedExperts, "expert_weights", lambda *a: pytest.fail("widened all"))
    x = torch.randn(tokens, 64).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2)
    with torch.inference_mode():
        got, want = q(x, idx, w).float(), ref(x, idx, w).float()
    # w8a8 quantizes the activations too: 8 bits (7 of range) per row
    assert (got - want).norm() < (0.04 if fmt == "w8a8" else 0.02) * want.norm()


@pytest.mark.parametrize("fmt", ["int8", "w8a8"])
@pytest.mark.parametrize(
    "rows", [1, 16, 40]
)  # the int8 kernel (bf16 to 8 rows, fp32 to 32), the weight widened once
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fp32 rows: the kernel in bf16 on x86
def test_quant_linear_equals_its_dequantized_weight(rows, fmt, dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=False).to(dtype)
    q = QuantLinear(lin, fmt)
    x = torch.randn(2, rows, 64).to(dtype)
    with torch.inference_mode():
        got = q(x).float()
        want = torch.nn.functional.linear(x, q.dequantize()).float()
    assert got.shape == (2, rows, 96)
    assert (got - want).norm() < (0.03 if fmt == "w8a8" else 0.01) * want.norm()


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_an_fp16_quant_linear_does_not_overflow_on_its_unscaled_sums(fmt):
    """fp16 tops out at 65504: a row of 1024 weights of 0.01 stores q = 127 (int8) or 448 (e4m3) for
    each, so x·q before the scale is 130048 (458752) for x of ones, inf in fp16, though x·w is 10.24."""
    lin = torch.nn.Linear(1024, 2, bias=False)
    torch.nn.init.constant_(lin.weight, 0.01)
    q = QuantLinear(lin.to(torch.float16), fmt)
    with torch.inference_mode():
        got = q(torch.ones(3, 1024, dtype=torch.float16))
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), torch.full((3, 2), 10.24), rtol=2e-3, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_weights_are_the_nearest_steps_of_a_per_row_scale(fmt):
    """w ≈ q·s with one scale per output row, s = max|w_row| / 127 (int8) or / 448 (e4m3): each row
    reaches the top of the range; int8 rounds to the nearest step (half a step off at most), e4m3 keeps
    3 mantissa bits (1/16 of a value off at most); an all-zero row stays zero. The stored linear and
    routed experts dequantize to exactly that (their scales in the model's dtype, here fp32)."""
    from nanoseek.engine.quantize import QuantRoutedExperts, quantize_tensor
    from nanoseek.model.moe import RoutedExperts

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 32, 64, generator=g) * torch.logspace(-3, 1, 32).unsqueeze(-1)  # rows 1e4 apart
    w[0, 5] = 0
    q, s = quantize_tensor(w, fmt)
    assert q.shape == w.shape and s.shape == w.shape[:-1]
    top = 127.0 if fmt == "int8" else 448.0
    amax = q.float().abs().amax(-1)
    assert amax[0, 5] == 0 and (amax == top).sum() == amax.numel() - 1
    step = s.unsqueeze(-1)
    bound = step / 2 if fmt == "int8" else w.abs() / 16 + step * 2**-10  # e4m3's subnormal steps: 2^-9
    err = (q.float() * step - w).abs()
    assert torch.all(err <= bound * (1 + 1e-5)), float((err / bound).max())
    lin = torch.nn.Linear(64, 32, bias=False)
    experts = RoutedExperts(4, 64, 16)  # gate_up [4, 32, 64], down [4, 64, 16]
    d = w.reshape(4, 64, 32)[..., :16]
    with torch.no_grad():
        lin.weight.copy_(w[0])
        experts.gate_up_proj.copy_(w)
        experts.down_proj.copy_(d)
    ql, qe = QuantLinear(lin, fmt), QuantRoutedExperts(experts, fmt)
    assert torch.equal(ql.dequantize(), q[0].float() * step[0])
    gate_up, down = qe.expert_weights()
    assert torch.equal(gate_up, q.float() * step)
    q2, s2 = quantize_tensor(d, fmt)
    assert torch.equal(down, q2.float() * s2.unsqueeze(-1))
    sel = torch.tensor([2, 0, 2])  # a decode step's chosen experts
    assert all(torch.equal(a, b[sel]) for a, b in zip(qe.expert_weights(sel), (gate_up, down), strict=True))


@pytest.mark.parametrize("fmt", ["int8", "fp8", "w8a8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quant_linear_in_each_dtype_adds_its_bias(fmt, dtype):
    """Qwen2's q/k/v linears have biases: kept in the model's dtype and added, as nn.Linear does, in
    fp16 (which scales the weight, not the sums) and fp32, and under autocast (another dtype)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    with torch.no_grad():
        lin.bias.normal_(0, 1)
        lin.weight.mul_(torch.logspace(-2, 1, 96).unsqueeze(-1))  # each row's scale its own
    q = QuantLinear(lin.to(dtype), fmt)
    x = torch.randn(3, 64).to(dtype)
    with torch.inference_mode():
        got = q(x).float()
        want = torch.nn.functional.linear(x.float(), q.dequantize().float(), q.bias.float())
        assert (got - want).norm() < (0.03 if fmt == "w8a8" else 0.01) * want.norm()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 activations into a model in `dtype`
            got = q(x.bfloat16()).float()
    assert (got - want).norm() < 0.03 * want.norm()


def test_a_tied_head_stays_in_full_precision():
    """Tied to the embedding (which stays full precision) the head is not quantized: an int8 copy
    would add its bytes beside the weight the embedding keeps, and round the logits."""
    model = DeepSeekV3(small_config(tie_word_embeddings=True)).init_weights(0)
    q = quantize_model(model, "int8")
    assert isinstance(q.lm_head, torch.nn.Linear) and q.lm_head.weight is q.model.embed_tokens.weight


def test_int8_kernel_runs_only_on_rows_it_can_load():
    """PyTorch's weight-only int8 kernel steps through K 16 values at a time with aligned loads (bf16 on
    x86): an in_features of 40 or 13 (a linear's, or the routed experts' down projection, whose
    width the probe on gate_up never saw), or rows that start off its alignment, read past the rows
    or crashed the process (a segfault). Those widths widen the weight instead; a misaligned view is
    copied. In a subprocess, so that a crash is a failure, not the end of the test run."""
    import subprocess
    import sys

    code = """
import torch
from nanoseek.engine.quantize import QuantLinear, QuantRoutedExperts
from nanoseek.model.moe import RoutedExperts

def close(got, want):
    return (got.float() - want.float()).norm() < 0.01 * want.float().norm()

torch.manual_seed(0)
for k, off in ((40, 0), (13, 0), (64, 1), (64, 8)):
    q = QuantLinear(torch.nn.Linear(k, 37, bias=False).to(torch.bfloat16), "int8")
    for rows in (1, 3):
        x = torch.randn(rows * k + off).to(torch.bfloat16)[off:].view(rows, k)
        with torch.inference_mode():
            assert close(q(x), torch.nn.functional.linear(x, q.dequantize())), (k, off, rows)
dense = RoutedExperts(8, 64, 40).to(torch.bfloat16)
with torch.no_grad():
    dense.gate_up_proj.normal_(0, 0.2)
    dense.down_proj.normal_(0, 0.2)
q = QuantRoutedExperts(dense, "int8")
ref = RoutedExperts(8, 64, 40).to(torch.bfloat16)
with torch.no_grad():
    gu, d = q.expert_weights()
    ref.gate_up_proj.copy_(gu)
    ref.down_proj.copy_(d)
x, idx, w = torch.randn(3, 64).to(torch.bfloat16), torch.tensor([[0, 1], [2, 3], [0, 4]]), torch.rand(3, 2)
with torch.inference_mode():
    assert close(q(x, idx, w), ref(x, idx, w))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_w8a8_output_does_not_depend_on_batch_mates(model):
    """Activations are quantized per row: one scale per call made a request's tokens change with what
    else shared its decode batch, and speculative greedy differ from plain greedy."""
    p, others = [3, 17, 99, 4, 250, 8, 61], [[400, 2, 9], list(range(20, 61)), [7, 7, 7, 7, 300]]
    e = Engine(copy.deepcopy(model), quantize="w8a8", max_batch_size=8)
    alone = e.generate_detailed([p], max_new_tokens=16, logprobs=0)[0]
    batched = e.generate_detailed([p, *others], max_new_tokens=16, logprobs=0)[0]
    assert batched.token_ids == alone.token_ids
    assert [lp.logprob for lp in batched.logprobs] == pytest.approx(
        [lp.logprob for lp in alone.logprobs], abs=1e-5
    )
    spec = Engine(copy.deepcopy(model), quantize="w8a8", speculative=True)
    assert spec.generate([p, *others], max_new_tokens=12) == e.generate([p, *others], max_new_tokens=12)


def test_a_tiny_temperature_samples_the_argmax(model):
    # logits / 1e-45 overflows to inf: softmax NaN picked the last token id at every step
    e = Engine(model)
    greedy = e.generate([[1, 2]], max_new_tokens=5)
    assert e.generate([[1, 2]], max_new_tokens=5, temperature=1e-45, seed=0) == greedy


def test_a_w8a8_engine_packs_every_weight_when_it_is_built(model):
    """When the engine is built, not in the first request (which would otherwise wait for the whole
    model's packing): every int8 copy is freed before any request, and the weights are those that
    packing at the first call makes (the model's forward is bit-identical both ways)."""
    from nanoseek.engine.quantize import QuantRoutedExperts

    kinds = (QuantLinear, QuantRoutedExperts)
    lazy = quantize_model(copy.deepcopy(model), "w8a8")
    assert all(m._w8a8 is None for m in lazy.modules() if isinstance(m, kinds))
    engine = Engine(copy.deepcopy(model), quantize="w8a8")
    quant = [m for m in engine.model.modules() if isinstance(m, kinds)]
    assert quant and all(m._w8a8 is not None for m in quant)
    for m in quant:
        stored = [m.qweight] if isinstance(m, QuantLinear) else [m.q_gate_up, m.q_down]
        assert all(t.untyped_storage().nbytes() == 1 for t in stored)
    ids = torch.tensor([PROMPTS[2]])
    with torch.inference_mode():
        assert torch.equal(engine.model(ids), lazy(ids))
    assert len(engine.generate([PROMPTS[0]], max_new_tokens=4)[0]) == 4


def test_w8a8_frees_the_int8_copy_the_backend_took_over():
    """The quantized backend packs its own copy of each weight at the first call: the int8 buffers
    then shrink to one element each, and the weights read back (dequantized) are unchanged."""
    from nanoseek.engine.quantize import QuantRoutedExperts
    from nanoseek.model.moe import RoutedExperts

    torch.manual_seed(0)
    lin = QuantLinear(torch.nn.Linear(64, 96, bias=False).to(torch.bfloat16), "w8a8")
    dense = RoutedExperts(8, 64, 32).to(torch.bfloat16)
    with torch.no_grad():
        dense.gate_up_proj.normal_(0, 0.2)
        dense.down_proj.normal_(0, 0.2)
    experts = QuantRoutedExperts(dense, "w8a8")
    w, (gu, d) = lin.dequantize(), experts.expert_weights()
    x = torch.randn(5, 64).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(5)])
    gates = torch.rand(5, 2)
    with torch.inference_mode():
        y1, e1 = lin(x), experts(x, idx, gates)
        y2, e2 = lin(x), experts(x, idx, gates)  # after the swap: the same results
    assert torch.equal(y1, y2) and torch.equal(e1, e2)
    for t in (lin.qweight, experts.q_gate_up, experts.q_down):
        assert t.untyped_storage().nbytes() == 1
        assert t._version == 0  # made under inference mode, yet a plain tensor: MLA keys on versions
    assert lin.qweight.shape == (96, 64) and experts.q_gate_up.shape == (8, 64, 64)
    assert torch.equal(lin.dequantize(), w)
    gu2, d2 = experts.expert_weights()
    assert torch.equal(gu2, gu) and torch.equal(d2, d)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantize_tensor_a_few_rows_at_a_time_equals_it_whole(fmt, monkeypatch):
    """Loading quantizes a multi-GB head in chunks of rows (small fp32 temporaries): the same values."""
    import nanoseek.engine.quantize as quantize

    w = torch.randn(3, 50, 70, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    whole_q, whole_s = quantize.quantize_tensor(w, fmt)
    monkeypatch.setattr(quantize, "QUANT_CHUNK", 3 * 70)  # 3 rows at a time, the last chunk shorter
    q, s = quantize.quantize_tensor(w, fmt)
    assert q.shape == w.shape and s.shape == w.shape[:-1]
    assert torch.equal(q.view(torch.int8), whole_q.view(torch.int8)) and torch.equal(s, whole_s)


@pytest.mark.skipif(
    __import__("platform").machine().lower() not in ("x86_64", "amd64"), reason="x86's kernel choice"
)
def test_int8_kernel_runs_in_bf16_on_x86_for_fp32_rows_too():
    """x86 builds vectorize the weight-only int8 kernel for bf16 only. fp32 rows (nanoseek's own
    checkpoints load so, and `--dtype auto` on a CPU without native bf16) widened the weight instead:
    V2-Lite's int8 head, 0.8 GB of fp32 allocated each step, made batch-1 decode 1.3 tok/s where the
    kernel on the rows rounded to bf16 makes it ~16. fp16 keeps widening (its scalar loop is slower)."""
    from nanoseek.engine.quantize import QuantLinear

    for dtype, kernel in ((torch.float32, True), (torch.float16, False), (torch.bfloat16, True)):
        q = QuantLinear(torch.nn.Linear(64, 32, bias=False).to(dtype), "int8")
        with torch.inference_mode():
            got = q(torch.randn(1, 64).to(dtype))
        assert q._kernel is kernel, dtype
        assert got.dtype == dtype


@pytest.mark.parametrize(
    ("dtype", "rows", "kernel"),
    [
        (torch.bfloat16, 8, True),
        (torch.bfloat16, 9, False),
        (torch.float32, 32, True),  # rounded to bf16 on x86: widened, the weight runs fp32's slower GEMM
        (torch.float32, 33, False),
    ],
)
def test_the_int8_kernel_takes_fp32_rows_further_than_bf16_ones_on_x86(monkeypatch, dtype, rows, kernel):
    """16 concurrent decodes widened every int8 weight for fp32's GEMM at 16 rows on an AVX2 CPU: the
    V2-Lite-width head 1.9x slower than the kernel, which is 2-3x per matrix at batch 16."""
    from nanoseek.engine import quantize

    monkeypatch.setattr(quantize, "ON_X86", True)
    calls = []
    kernel_op = torch.ops.aten._weight_int8pack_mm
    monkeypatch.setattr(
        torch.ops.aten, "_weight_int8pack_mm", lambda x, *a: calls.append(x.dtype) or kernel_op(x, *a)
    )
    q, s = quantize.quantize_tensor(torch.randn(48, 64), "int8")
    x = torch.randn(rows, 64).to(dtype)
    got = quantize._quant_linear(x, q, s, kernel=True)
    assert calls == ([torch.bfloat16] if kernel else [])
    want = torch.nn.functional.linear(x.float(), q.float() * s.unsqueeze(-1))
    assert (got.float() - want).norm() < 0.01 * want.norm()


def test_a_large_int8_weight_is_widened_a_few_rows_at_a_time(monkeypatch):
    """Past the kernel's few rows a weight is widened for the GEMM: in blocks of output rows, not whole
    (a 102400 x 2048 head was 0.8 GB of fp32 per call). The blocks give the whole product."""
    from nanoseek.engine import quantize

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 100, bias=False)
    q = quantize.QuantLinear(lin, "int8")
    x = torch.randn(40, 64, generator=g)  # past the kernel's rows in any dtype
    with torch.inference_mode():
        whole = q(x)
        monkeypatch.setattr(quantize, "QUANT_CHUNK", 64 * 7)  # 7 rows a block
        calls, quant_linear = [], quantize._quant_linear
        monkeypatch.setattr(
            quantize,
            "_quant_linear",
            lambda x, w, *a, **k: calls.append(w.shape[0]) or quant_linear(x, w, *a, **k),
        )
        blocks = q(x)
    torch.testing.assert_close(
        blocks, whole, rtol=1e-6, atol=1e-6
    )  # (GEMMs of other widths sum in other orders)
    assert calls == [100] + [7] * 14 + [2]


# ------------------------------------------------------------------ properties (hypothesis)
def brute_force_kept(row: list[float], params: SamplingParams) -> tuple[set[int], bool]:
    """The tokens a sampled row may draw, by the definitions, in float64 over the whole vocabulary: top-k
    (ties with the k-th kept), then the smallest run by logit (lowest id first among ties) whose mass
    reaches top_p, then min_p of the top probability. Also whether a cut lies within a rounding of a
    boundary (float32 may then fall either way)."""
    v = len(row)
    x = [t / params.temperature for t in row]
    order = sorted(range(v), key=lambda i: (-x[i], i))
    k = params.top_k if 0 < params.top_k < v else v
    kept = [i for i in order if x[i] >= x[order[k - 1]]]
    top = x[order[0]]
    p = {i: math.exp(x[i] - top) for i in kept}
    z = sum(p.values())
    p = {i: q / z for i, q in p.items()}
    close = False
    if params.top_p < 1.0:
        out, mass = [], 0.0
        for i in kept:
            close |= abs(mass - params.top_p) < 1e-4
            if out and mass >= params.top_p:
                break
            out.append(i)
            mass += p[i]
        kept = out
    z = sum(p[i] for i in kept)
    pmax = max(p[i] for i in kept) / z
    if params.min_p > 0:
        close |= any(abs(p[i] / z - params.min_p * pmax) < 1e-4 for i in kept)
        kept = [i for i in kept if p[i] / z >= params.min_p * pmax]
    return set(kept), close


def sampled_params(v: int):
    return st.builds(
        SamplingParams,
        temperature=st.sampled_from([0.25, 0.7, 1.0, 1.5]),
        top_k=st.sampled_from([0, 1, 2, 5, SORT_HEAD - 1, SORT_HEAD, SORT_HEAD + 1, v - 1, v, v + 3]),
        top_p=st.sampled_from([1.0, 0.999, 0.95, 0.5, 0.1, 1e-3]) | st.floats(0.01, 1.0),
        min_p=st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0]),
        seed=st.integers(0, 2**32),
    )


@st.composite
def logit_rows(draw):
    """A batch of logits rows (ties common: bf16 logits tie often) with each row's sampling params."""
    v = draw(st.sampled_from([3, 7, SORT_HEAD, SORT_HEAD + 1, 2 * SORT_HEAD + 5, 4 * SORT_HEAD]))
    b = draw(st.integers(1, 4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    logits = torch.randn(b, v, generator=gen) * draw(st.sampled_from([0.5, 2.0, 4.0]))
    step = draw(st.sampled_from([0.0, 0.25, 1.0]))  # rounded to a step: ties
    if step:
        logits = (logits / step).round() * step
    logits[:, : min(4, v)] += draw(st.sampled_from([0.0, 0.0, 6.0]))  # peaked: kept sets in the head
    return logits, [draw(sampled_params(v)) for _ in range(b)]


@examples(100)
@given(batch=logit_rows())
def test_filters_keep_exactly_the_tokens_a_brute_force_reference_keeps_alone_or_batched(batch):
    """top-k, top-p and min-p keep the tokens the definitions do (a float64 loop over the vocabulary), in
    any batch: a row's probabilities and its seeded draw are the same bits as alone."""
    logits, params = batch
    probs = processed_probs(logits, params)
    states = [SamplerState(p, [0], logits.shape[1]) for p in params]
    drawn = sample(logits, states)
    for i, p in enumerate(params):
        alone = processed_probs(logits[i : i + 1], [p])[0]
        assert torch.equal(probs[i], alone), p
        assert int(drawn[i]) == int(sample(logits[i : i + 1], [SamplerState(p, [0], logits.shape[1])])[0])
        kept, close = brute_force_kept(logits[i].tolist(), p)
        nonzero = set(probs[i].nonzero().flatten().tolist())
        if not close:
            assert nonzero == kept, p
        assert int(drawn[i]) in nonzero and math.isclose(float(probs[i].sum()), 1.0, rel_tol=1e-5)


# values a Python caller may pass for a number: Python's, numpy's, torch's 0-d tensors, exact fractions,
# and ones of no number type at all
_REALS = st.sampled_from(
    [0, 1, 2, 0.5, 1e-6, 1e6, -1.0, math.nan, math.inf, np.float32(0.7), np.float64(1.5), np.int64(1)]
    + [torch.tensor(0.7), Fraction(1, 2), Fraction(3, 2), Decimal("0.5"), True, "0.7", None]
)
_INTS = st.sampled_from(
    [0, 1, 3, -1, 2**70, np.int64(3), np.int64(-2), np.int32(2), torch.tensor(3), True, 2.0, 2.5, "3", None]
)
_FIELDS = dict(
    max_new_tokens=_INTS,
    temperature=_REALS,
    top_p=_REALS,
    top_k=_INTS,
    min_p=_REALS,
    repetition_penalty=_REALS,
    presence_penalty=_REALS,
    frequency_penalty=_REALS,
    seed=_INTS,
    logprobs=_INTS,
    stop_token_ids=st.sampled_from([[], [3], (3, 4), np.array([3]), torch.tensor([3]), 3, "3", [3.5]]),
    logit_bias=st.dictionaries(_INTS, _REALS, max_size=2),
)


@examples(60)
@given(fields=st.fixed_dictionaries({}, optional=_FIELDS))
def test_sampling_params_are_refused_naming_the_field_or_served_without_harm_to_batch_mates(model, fields):
    """Whatever a Python caller passes: add_request refuses it with a ValueError naming the field, or the
    request runs to the end (its batch mate's seeded tokens the same as without it). A type `validate`
    let through used to fail the request with a bare TypeError, or a whole step, batch mates included."""
    mate = SamplingParams(max_new_tokens=3, temperature=1.0, seed=5)
    want = Engine(model, max_seq_len=64).generate([PROMPTS[1]], mate)[0]
    engine = Engine(model, max_seq_len=64)
    engine.add_request(PROMPTS[1], mate, request_id="mate")
    try:
        engine.add_request(PROMPTS[0], SamplingParams(**fields), request_id="it")
    except ValueError as e:
        assert any(name in str(e) for name in fields), (fields, e)
        return
    got: dict[str, list[int]] = {"mate": [], "it": []}
    while engine.has_unfinished():
        for ev in engine.step():
            assert ev.error is None, (fields, ev.error)
            got[ev.request_id] += ev.new_token_ids
    assert got["mate"] == want and all(0 <= t < model.config.vocab_size for t in got["it"])
