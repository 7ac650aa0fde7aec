"""The embedded corpus: reproducible, multilingual, chat-formatted in part, fast, never a held-out problem."""

import itertools
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data import synthetic
from nanoseek.data.rewards import script_counts
from nanoseek.data.tasks import BUILTIN_TASKS, BuiltinTask, get_task, split_of

USER, ASSISTANT, EOS = "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"


def _docs(n, **kw):
    return list(itertools.islice(synthetic.iter_documents(**kw), n))


def test_reproducible_and_seeded():
    a, b, c = _docs(200, seed=0), _docs(200, seed=0), _docs(200, seed=1)
    assert a == b and a != c
    assert len(set(a)) > 190


def test_default_is_chat_turns_and_shapes_can_be_weighed():
    assert all(d.startswith(USER) for d in _docs(300, seed=1))
    copies = _docs(50, seed=1, shapes={"copy": 1.0})
    for d in copies:
        first, second = d.split("\n")
        assert first.split(" ", 1)[1] == second  # written out again, after a header per language
    with pytest.raises(ValueError, match="shapes"):
        _docs(1, shapes={"poem": 1.0})
    with pytest.raises(ValueError, match="harder_fraction"):
        _docs(1, harder_fraction=1.5)


def test_shapes_and_chat_template():
    docs = _docs(2000, seed=3, shapes=synthetic.MIXED_SHAPES)
    chat = [d for d in docs if d.startswith(USER)]
    assert 0.25 < len(chat) / len(docs) < 0.45
    for d in chat:
        # exactly the R1 template the tokenizer renders, with the think block the generation prompt opens
        assert re.fullmatch(rf"{USER}[^\n]+{ASSISTANT}<think>\n.+\n</think>\n[^\n]+{EOS}", d, re.DOTALL), d
        assert d.count("<think>") == d.count("</think>") == 1
    plain = [d for d in docs if not d.startswith(USER)]
    assert all(USER not in d and EOS not in d for d in plain)
    assert any(d.count("</think>") >= 2 for d in plain)  # several problems in a row
    assert any(d.startswith(("Question:", "問題:", "问题:")) for d in plain)  # textbook form
    assert any(d.startswith(synthetic.EXPLANATIONS["arithmetic"]["en"]) for d in plain)
    for family in ("arithmetic", "countdown", "linear_equation", "sorting", "word_problem"):
        assert any(
            family in synthetic.EXPLANATIONS and d.startswith(synthetic.EXPLANATIONS[family][lang])
            for d in plain
            for lang in ("en", "ja", "zh")
        )


def test_languages():
    docs = _docs(600, seed=0)
    counts = [script_counts(d) for d in docs]
    assert sum(c["kana"] > 0 for c in counts) > 100  # Japanese
    assert sum(c["han"] > 0 and c["kana"] == 0 for c in counts) > 100  # Chinese
    assert sum(c["han"] == c["kana"] == 0 for c in counts) > 100  # English
    ja = _docs(200, seed=0, languages=("ja",))
    assert all(script_counts(d)["kana"] > 0 for d in ja)
    with pytest.raises(ValueError, match="languages"):
        _docs(1, languages=("fr",))
    with pytest.raises(ValueError, match="split"):
        _docs(1, split="val")


def test_never_a_heldout_problem(monkeypatch):
    # 1) every problem that goes into a document is of the train split
    seen = []
    original = BuiltinTask.make

    def spy(self, d, lang):
        p = original(self, d, lang)
        seen.append((self.family, self.split_key(d)))
        return p

    monkeypatch.setattr(BuiltinTask, "make", spy)
    docs = _docs(4000, seed=5)
    monkeypatch.setattr(BuiltinTask, "make", original)
    assert len({f for f, _ in seen}) == len(BUILTIN_TASKS)
    assert all(split_of(key) == "train" for _, key in seen)

    # 2) independently of the generator: read the problems back out of the text, asked in the
    # families' first wordings (the same problems as in any other wording)
    first = "\n".join(_docs(4000, seed=5, tasks=[f"{name}?wording=first" for name in BUILTIN_TASKS]))
    sums = re.findall(r"What is (\d+) ([+×-]) (\d+)\?", first)
    eqs = re.findall(rf"Solve for x: (\d+)x ([+-]) (\d+) = (-?\d+)(?:\n|{ASSISTANT})", first)
    assert len(sums) > 100 and len(eqs) > 30
    arith = get_task("arithmetic")
    for a, op, b in sums:
        d = {"op": {"+": "add", "-": "sub", "×": "mul"}[op], "a": int(a), "b": int(b)}
        assert split_of(f"arithmetic|{arith.key(d)}") == "train"
    for a, sign, b, c in eqs:
        key = f"{a}|{int(b) if sign == '+' else -int(b)}|0|{c}"
        assert split_of(f"linear_equation|{key}") == "train"

    # 3) no held-out prompt of any family appears as a question anywhere in the corpus
    corpus = "\n".join(docs)
    questions = set()
    for line in corpus.splitlines():
        line = line.removeprefix(USER).split(ASSISTANT)[0]
        questions.add(re.sub(r"^(Question|問題|问题): ", "", line))
    assert sum(p.prompt in questions for p in get_task("modular").problems("train", 300, seed=0)) > 10
    for name in BUILTIN_TASKS:
        for p in get_task(name).problems("test", 100, seed=0):
            assert p.prompt not in questions, p.prompt


def test_fast_enough():
    best = 0.0
    for _ in range(2):  # a shared CI machine: take the better of two
        it = synthetic.iter_documents(seed=11)
        t0 = time.perf_counter()
        n = sum(1 for _ in itertools.islice(it, 3000))
        best = max(best, n / (time.perf_counter() - t0))
    assert best > 2000, f"{best:.0f} docs/s"


def test_harder_problems_are_one_level_above_the_familys_own():
    """`harder_fraction` draws from one difficulty above the spec's own, not from difficulty 2 whatever
    the spec says (that was the spec's own level at difficulty=2, and easier at difficulty=3)."""

    def digits(spec):
        docs = _docs(60, seed=2, tasks=[spec], harder_fraction=1.0, languages=("en",))
        return {len(a) for d in docs for a in re.findall(r"(\d+) \+ \d+", d.split(ASSISTANT)[0])}

    assert digits("arithmetic?ops=add") == {3}  # difficulty 1 (2 digits) -> 2
    assert digits("arithmetic?ops=add&difficulty=2") == {4}
    assert digits("arithmetic?difficulty=3&ops=add") == {5}
    with pytest.raises(ValueError, match="at least one"):
        _docs(1, tasks=[])


def test_blank_spelled_drops_only_the_strings_read_letter_by_letter():
    kw = dict(seed=4, tasks=["counting", "sorting"], shapes=synthetic.MIXED_SHAPES)
    docs, blanked = _docs(400, **kw), _docs(400, blank_spelled=True, **kw)
    changed = [(a, b) for a, b in zip(docs, blanked, strict=True) if a != b]
    assert changed and len(changed) < len(docs)  # every counting document, no sorting one
    for a, b in changed:
        texts = re.findall(r'"([a-h]+)"|「([a-h]+)」|“([a-h]+)”', a)
        texts = [t for group in texts for t in group if len(t) > 1]
        assert texts and all(t not in b for t in texts)
        assert a.count("\n") == b.count("\n")  # the worked solution, spelled out, stays
    # a series holds several problems: none of their texts is left
    series = _docs(300, blank_spelled=True, seed=5, tasks=["counting"], shapes={"series": 1.0})
    assert all(not re.search(r"「[a-h]{2,}」|“[a-h]{2,}”|\"[a-h]{2,}\"", d) for d in series)


def test_the_corpus_asks_in_every_trained_wording_and_never_a_held_out_one():
    task = get_task("comparison")  # as the speedrun's corpus names it: varied wordings by default
    asked = {
        re.sub(r"\d+", "N", d.split(ASSISTANT)[0].removeprefix(USER))
        for d in _docs(1500, seed=3, tasks=[task.name])
    }

    def shapes(wordings):  # every phrasing with its numbers as N, for both questions
        return {
            form.format(**task.fields({"a": "N", "b": "N", "which": which}, lang))
            for lang, forms in wordings.items()
            for form in forms
            for which in ("larger", "smaller")
        }

    seen, unseen = shapes(task.WORDINGS), shapes(task.UNSEEN_WORDINGS)
    assert asked == seen and not asked & unseen  # every trained phrasing, never a held-out one


def test_chats_of_several_questions():
    """`multi_turn`: that share of the chats asks 2-3 questions of one language in a row; the earlier
    answers come as the template renders a chat's history (no reasoning), the last with its worked
    solution; a chat stays within one training window."""
    from nanoseek.tokenizer import render_chat

    assert _docs(300, seed=2, multi_turn=0.0) == _docs(300, seed=2)  # off: the stream as it was
    docs = _docs(3000, seed=2, multi_turn=0.3)
    several = [d for d in docs if d.count(USER) > 1]
    assert 0.15 < len(several) / len(docs) < 0.35  # a chat too long for a window keeps fewer questions
    assert max(d.count(USER) for d in several) == 3
    assert max(map(len, several)) <= synthetic.CHAT_CHARS
    for d in several:
        assert d.count("<think>") == d.count("</think>") == 1  # reasoning in the last answer only
        turns = d.split(USER)[1:]
        *earlier, last = turns
        assert re.fullmatch(rf"[^\n]+{ASSISTANT}<think>\n.+\n</think>\n[^\n]+{EOS}", last, re.DOTALL), d
        history = []
        for t in earlier:
            question, answer = t.removesuffix(EOS).split(ASSISTANT)
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        assert d.startswith(render_chat(history, bos_token="", add_generation_prompt=False))
        langs = set()
        for t in turns:  # one language a chat
            counts = script_counts(t.split(ASSISTANT)[0])
            langs.add("ja" if counts["kana"] else "zh" if counts["han"] else "en")
        assert len(langs) == 1, d
    families = {re.sub(r"\d+", "N", t.split(ASSISTANT)[0]) for d in several for t in d.split(USER)[1:]}
    assert len(families) > 20  # the families (and wordings) mixed within chats
    with pytest.raises(ValueError, match="multi_turn"):
        _docs(1, multi_turn=1.5)


def test_follow_ups_of_one_kind():
    """`same_family`: each further question of a chat is of the first one's family with that chance,
    else of any family's (here two, told apart by the quotes a counting prompt has)."""

    def alike(same_family=synthetic.SAME_FAMILY):
        docs = _docs(1500, seed=1, tasks=["counting", "addition"], multi_turn=1.0, same_family=same_family)
        pairs = []
        for d in docs:
            kinds = [any(c in t.split(ASSISTANT)[0] for c in '"「“') for t in d.split(USER)[1:]]
            pairs += [k == kinds[0] for k in kinds[1:]]
        return sum(pairs) / len(pairs), len(pairs)

    assert alike(1.0)[0] == 1.0
    share, n = alike()
    assert n > 1000 and 0.68 < share < 0.82  # 1/2 the first's, else 1/2 of the rest: 3/4
    assert 0.42 < alike(0.0)[0] < 0.58
    with pytest.raises(ValueError, match="same_family"):
        _docs(1, same_family=-0.1)


def test_an_earlier_answer_is_rendered_as_a_later_turn_task_renders_it():
    """The history of a corpus chat holds each earlier answer as `task?turn=N` (and a client of the
    server) sends it back: the answer alone, not the newline that follows </think> in a worked solution."""
    from nanoseek.data.tasks import as_second_turn
    from nanoseek.tokenizer import render_chat

    docs = [d for d in _docs(300, seed=2, tasks=["comparison"], multi_turn=1.0) if d.count(USER) > 1]
    assert docs
    for d in docs:
        for t in d.split(USER)[1:-1]:
            answer = t.removesuffix(EOS).split(ASSISTANT)[1]
            assert re.fullmatch(r"\d+", answer), repr(answer)
    p = get_task(as_second_turn("comparison")).problems("test", 1, seed=0)[0]
    earlier = render_chat(p.messages, bos_token="").split(USER)[1]
    assert re.fullmatch(rf"[^\n]+{ASSISTANT}\d+{EOS}", earlier), repr(earlier)


def test_another_seed_draws_other_problems_in_another_mix(monkeypatch):
    """The seed reseeds both the mix (which family, shape, language) and each family's problems: two
    seeds that drew one family's same problems in a new order were not two corpora."""
    original = BuiltinTask.make
    drawn: dict[int, list[tuple[str, str]]] = {}
    for seed in (0, 1):
        seq = drawn[seed] = []

        def spy(self, d, lang, seq=seq):
            seq.append((self.family, self.key(d)))
            return original(self, d, lang)

        monkeypatch.setattr(BuiltinTask, "make", spy)
        _docs(300, seed=seed)
    assert [f for f, _ in drawn[0]] != [f for f, _ in drawn[1]]
    for family in BUILTIN_TASKS:
        first = [[k for f, k in drawn[seed] if f == family][:10] for seed in (0, 1)]
        assert len(first[0]) == 10 and first[0] != first[1], family


@pytest.mark.parametrize("split", ["train", "test"])
def test_harder_problems_come_from_the_split_asked_for(monkeypatch, split):
    """The problems one level up are of the corpus's split too: a training corpus with
    `harder_fraction` must hold no held-out problem, a held-out one no training problem."""
    seen = []
    original = BuiltinTask.make

    def spy(self, d, lang):
        seen.append((self.family, self.difficulty, self.split_key(d)))
        return original(self, d, lang)

    monkeypatch.setattr(BuiltinTask, "make", spy)
    _docs(600, seed=2, split=split, harder_fraction=0.5)
    assert {level for _, level, _ in seen} == {1, 2}
    assert all(split_of(key) == split for _, _, key in seen)


def test_a_long_chat_drops_its_oldest_question_first(monkeypatch):
    """A chat too long for its window loses its earliest question, then the next: the questions
    kept are the latest ones, in order, right before the last."""
    calls = []
    original = synthetic.chat_document

    def spy(problem, worked, history=()):
        calls.append((problem.id, [q.id for q, _ in history]))
        return original(problem, worked, history)

    monkeypatch.setattr(synthetic, "chat_document", spy)
    monkeypatch.setattr(synthetic, "CHAT_CHARS", 150)
    _docs(300, seed=3, multi_turn=1.0)
    trimmed = 0
    for (last, before), (again, after) in itertools.pairwise(calls):
        if last == again and before:  # the same document written again, shorter
            assert after == before[1:]
            trimmed += 1
    assert trimmed > 20


def test_a_worksheet_is_in_one_language():
    """Every problem of a worksheet (`series`) is in its header's language."""
    for doc in _docs(300, seed=4, shapes={"series": 1.0}):
        counts = script_counts(doc)
        if doc.startswith("Practice problems."):
            assert counts["kana"] == counts["han"] == 0, doc
        elif doc.startswith("练习题。"):
            assert counts["kana"] == 0, doc


# ------------------------------------------------------------------ properties (hypothesis)
@settings(max_examples=30)
@given(
    seed=st.integers(0, 10**6),
    split=st.sampled_from(["train", "test"]),
    tasks=st.none()
    | st.lists(st.sampled_from(BUILTIN_TASKS), min_size=1, max_size=3),  # (a repeat: drawn more)
    shapes=st.none()
    | st.dictionaries(st.sampled_from(synthetic.SHAPE_NAMES), st.floats(0.1, 1.0), min_size=1),
    multi_turn=st.sampled_from([0.0, 0.5, 1.0]),
    harder_fraction=st.sampled_from([0.0, 0.3]),
)
def test_every_stream_is_its_seeds_and_holds_only_problems_of_its_split(
    seed, split, tasks, shapes, multi_turn, harder_fraction
) -> None:
    """Whatever the families, shapes, share of several-question chats and of harder problems: the same
    seed gives the same documents, and every problem in them is of the split asked for (training never
    reads a held-out one)."""
    from unittest import mock

    kw = dict(
        seed=seed,
        split=split,
        tasks=tasks,
        shapes=shapes,
        multi_turn=multi_turn,
        harder_fraction=harder_fraction,
    )
    keys = []
    original = BuiltinTask.make

    def spy(self, d, lang):
        keys.append(self.split_key(d))
        return original(self, d, lang)

    with mock.patch.object(BuiltinTask, "make", spy):
        docs = _docs(40, **kw)
    assert docs == _docs(40, **kw)
    assert keys and all(split_of(key) == split for key in keys)
