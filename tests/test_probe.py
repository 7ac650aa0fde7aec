"""The learning probe: which response tokens count as copies, and losses that track what a model knows."""

from __future__ import annotations

import torch

from nanoseek.probe import probe_documents, probe_losses, response_char_kinds


def test_copy_digit_text_kinds():
    text = "Which is larger, 47 or 29?|Compare the tens: 4 and 2: 4 > 2\nSo 47 is larger.\n</think>\n47"
    start = text.index("|") + 1
    kinds = response_char_kinds(text, start)
    assert kinds[:start] == [None] * start

    def kind_of(sub: str, nth: int = 0) -> set:
        i = -1
        for _ in range(nth + 1):
            i = text.index(sub, i + 1)
        return set(kinds[i : i + len(sub)])

    assert kind_of("4", 1) == {"digit"}  # one digit is never a copy: it coincides too easily
    assert kind_of("4", 2) == {"digit"} and kind_of("2", 2) == {"digit"}  # ...not even written twice
    assert kind_of("47", 1) == {"copy"} and kind_of("47", 2) == {"copy"}
    assert kind_of("Compare") == {"text"}
    # a number first written in the response is computed, its repetition is a copy
    text2 = "What is 3 + 9?|ones: 3 + 9 = 12\nSo 12"
    k2 = response_char_kinds(text2, text2.index("|") + 1)
    first, second = text2.index("12"), text2.rindex("12")
    assert set(k2[first : first + 2]) == {"digit"} and set(k2[second : second + 2]) == {"copy"}


class _Tok:
    """A character-level tokenizer with the backend interface the probe reads (ids and offsets)."""

    bos_token_id = 0

    def __init__(self) -> None:
        self.backend = self

    def encode(self, text: str, add_special_tokens: bool = False):
        class Enc:
            ids = [min(ord(c), 255) + 1 for c in text]
            offsets = [(i, i + 1) for i in range(len(text))]

        return Enc()


def test_probe_documents_mark_only_the_response():
    docs = probe_documents(_Tok(), ["comparison", "arithmetic?ops=add"], 3)
    assert len(docs) == 6 and {d.task for d in docs} == {"comparison", "arithmetic?ops=add"}
    for d in docs:
        assert len(d.ids) == len(d.kinds) == len(d.answer)
        assert d.kinds[0] is None and d.kinds[1] is None  # BOS and the prompt are not scored
        assert "copy" in d.kinds and "text" in d.kinds
        assert any(d.answer) and d.answer[-1]  # the tail is the final answer
        # exactly the characters after </think> (the character-level tokenizer: one token each)
        text = "".join(chr(i - 1) for i in d.ids[1:])
        after = text.rindex("</think>") + len("</think>")
        assert d.answer == [False] * (1 + after) + [True] * (len(text) - after)
        prompt_end = text.index("Assistant") - 2  # "<｜": the prompt's own digits are not scored either
        assert d.kinds[: 1 + prompt_end] == [None] * (1 + prompt_end) and d.kinds[1 + prompt_end] == "text"
    # a number that opens the response is scored too (a copy of the prompt's)
    assert response_char_kinds("12?|12", 4)[4:] == ["copy", "copy"]


def test_probe_losses_per_kind_and_task():
    """A model that predicts every next character perfectly scores ~0; a uniform one ln(vocab)."""
    docs = probe_documents(_Tok(), ["comparison"], 2)

    class Oracle(torch.nn.Module):
        def __init__(self, docs, vocab=257) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.docs, self.vocab = docs, vocab
            self.config = type("C", (), {"pad_token_id": 0})()

        def forward(self, ids):
            out = torch.zeros(*ids.shape, self.vocab)
            for r, row in enumerate(ids.tolist()):
                d = next(d for d in self.docs if row[: len(d.ids) - 1] == d.ids[:-1])
                for t in range(len(d.ids) - 1):
                    out[r, t, d.ids[t + 1]] = 50.0
            return out

    losses = probe_losses(Oracle(docs), docs)
    assert set(losses) >= {"copy", "digit", "text", "answer", "comparison/copy"}
    assert max(losses.values()) < 1e-3

    class Uniform(Oracle):
        def forward(self, ids):
            return torch.zeros(*ids.shape, self.vocab)

    uniform = probe_losses(Uniform(docs), docs)
    assert abs(uniform["copy"] - torch.log(torch.tensor(257.0)).item()) < 1e-4

    class WrongLast(Oracle):  # certain of a wrong last token: ~50 nats there, ~0 everywhere else
        def forward(self, ids):
            out = super().forward(ids)
            for r, row in enumerate(ids.tolist()):
                last = len(next(d for d in self.docs if row[: len(d.ids) - 1] == d.ids[:-1]).ids) - 2
                out[r, last] = 0.0
                out[r, last, 1] = 50.0
            return out

    model = WrongLast(docs).eval()
    wrong = probe_losses(model, docs)
    assert not model.training  # left in the mode it was in
    n_answer = sum(sum(d.answer) for d in docs)
    assert abs(wrong["answer"] - 2 * 50.0 / n_answer) < 1e-3


def test_greedy_accuracy_counts_no_answer_left_in_the_think_block():
    """The prompt opens the think block: an answer the model never closed it on is no answer (as in
    `nanoseek eval`), while the same answer after `</think>` is right."""
    from nanoseek.data.tasks import get_task
    from nanoseek.engine.engine import Completion
    from nanoseek.probe import greedy_accuracy
    from serve_fakes import tiny_tokenizer

    tok = tiny_tokenizer()
    problems = get_task("arithmetic").problems("test", 4, seed=0)

    class Answers:  # engine double: each problem's answer, with or without closing the think block
        def __init__(self, before: str) -> None:
            self.before = before

        def generate_detailed(self, prompts, params, on_finish=None):
            texts = [f"{self.before}{p.answer}" for p in problems]
            return [Completion([*tok.encode(t), tok.eos_token_id], None, "stop", None) for t in texts]

    assert greedy_accuracy(None, tok, ["arithmetic"], 4, engine=Answers("add\n</think>\n")) == {
        "arithmetic": 1.0
    }
    assert greedy_accuracy(None, tok, ["arithmetic"], 4, engine=Answers("")) == {"arithmetic": 0.0}


class _LineTok(_Tok):
    """A tokenizer of whole lines (each with its newline): one token can hold a copied number and a
    computed one ("47 + 38 = 85")."""

    def encode(self, text: str, add_special_tokens: bool = False):
        offsets, at = [], 0
        for line in text.splitlines(keepends=True):
            offsets.append((at, at + len(line)))
            at += len(line)

        class Enc:
            ids = [1 + i for i in range(len(offsets))]

        Enc.offsets = offsets
        return Enc()


def test_a_token_that_holds_a_copied_digit_is_a_copy_whatever_else_it_holds():
    """A token spanning a copied number and computed digits is scored as a copy (the copy is what a
    model that cannot look back gets wrong), a token with digits and text as computed, else text."""
    from nanoseek.data.synthetic import chat_document
    from nanoseek.data.tasks import get_task

    task = get_task("arithmetic?ops=add")
    (doc,) = probe_documents(_LineTok(), ["arithmetic?ops=add"], 1)
    (p,) = task.problems("test", 1, seed=0)
    text = chat_document(p, task.worked_solution(p))
    start = text.index(p.prompt) + len(p.prompt)
    chars = response_char_kinds(text, start)
    offsets = _LineTok().encode(text).offsets
    spans = [set(chars[a:b]) for a, b in offsets]
    assert any({"copy", "digit"} <= s for s in spans)  # such a token is there to be scored
    for (a, _), span, kind in zip(offsets, spans, doc.kinds[1:], strict=True):
        if a < start:  # a token that begins in the prompt is not scored
            assert kind is None
        elif "copy" in span:
            assert kind == "copy", span
        else:
            assert kind == ("digit" if "digit" in span else "text"), span
