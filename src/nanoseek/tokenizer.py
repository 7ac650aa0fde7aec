"""Byte-level BPE tokenizer with DeepSeek's special tokens and the DeepSeek-R1 chat template.

What is notable:
- Byte-level BPE (Hugging Face `tokenizers`), no normalizer: every string round-trips exactly,
  whatever script or emoji it holds, and no input can be out of vocabulary (all 256 bytes are tokens).
- Pre-tokenization is Qwen2's split regex (GPT-4's with one token per digit): arithmetic sees place
  value the same way in every number, and a run of letters of any script (Chinese and Japanese
  included) is one piece. It is one of llama.cpp's known pre-tokenizers ("qwen2"), so a GGUF export
  tokenizes in llama.cpp exactly as here (`LLAMA_CPP_PRE`, `llama_cpp_pre_tokenizer`).
- DeepSeek's token strings: `<｜begin▁of▁sentence｜>`, `<｜end▁of▁sentence｜>`, `<｜▁pad▁｜>` are special
  (dropped by `skip_special_tokens`); `<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>` are single-id
  added tokens that stay in decoded text, as in DeepSeek-R1's own tokenizer.
- The R1 chat template is implemented twice: in Python (`render_r1_chat`, what nanoseek runs) and as the
  Jinja `chat_template` saved to `tokenizer_config.json` (what `transformers` runs); tests check they agree.
  Assistant turns in history lose their `<think>...</think>` part, as R1 does.
- `IncrementalDecoder` turns a stream of token ids into text deltas that never split a UTF-8 character:
  for byte-level tokenizers it works on the bytes themselves, otherwise it re-decodes a short suffix.
- `load_tokenizer` reads any HF `tokenizer.json` (+ `tokenizer_config.json`, DeepSeek's included).
"""

from __future__ import annotations

import codecs
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
# Special tokens are control-only and vanish under skip_special_tokens; the chat-structure tokens are
# single ids too but are kept in decoded text (DeepSeek marks them special=false), so a completion's
# "<think>...</think>" survives decoding for the reward functions.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD)
CHAT_TOKENS: tuple[str, ...] = (USER, ASSISTANT, THINK_START, THINK_END)

# The split regex: Qwen2's (GPT-4's with `\p{N}` instead of `\p{N}{1,3}`), one of the pre-tokenizers
# llama.cpp knows by name. DeepSeek-V3's own ("deepseek-v3") groups up to three digits and
# "deepseek-coder" leaves symbols such as `+` and `=` to fall between its pieces; Qwen2's keeps one
# token per digit and is the GPT-4 shape this tokenizer used before, without the CJK-run rule (a run
# of Han/kana is a run of letters here too, so merges still stay inside Chinese and Japanese words).
# llama.cpp applies its own copy of this regex to any GGUF whose `tokenizer.ggml.pre` is "qwen2".
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA_CPP_PRE = "qwen2"

# DeepSeek-R1's chat template (system / user / assistant turns), same output as the reference
# template on those roles. `render_r1_chat` below is the Python twin; keep the two in step.
R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}"
    "{%- endif %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] or '' %}"
    "{%- if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] != 'system' %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)

# Fallbacks for tokenizer.json files that come without a tokenizer_config.json.
_BOS_CANDIDATES = (BOS, "<s>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
_EOS_CANDIDATES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


def render_r1_chat(
    messages: Sequence[dict[str, Any]], bos_token: str = BOS, add_generation_prompt: bool = True
) -> str:
    """DeepSeek-R1's prompt format: BOS + system text, then `<｜User｜>q` / `<｜Assistant｜>a<｜end▁of▁sentence｜>`.

    Assistant history keeps only what follows `</think>` (R1 drops past reasoning; `reasoning_content`
    is ignored). The generation prompt opens the think block: `<｜Assistant｜><think>\\n`.
    """
    system: list[str] = []
    turns: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"chat message {i} must be a dict with a 'role', got {message!r}")
        role, content = message["role"], message.get("content")
        if role == "assistant" and content is None:
            content = ""
        if not isinstance(content, str):
            raise ValueError(
                f"chat message {i} ({role}): content must be a string, got {type(content).__name__}"
            )
        if role == "system":
            system.append(content)
        elif role == "user":
            turns.append(USER + content)
        elif role == "assistant":
            if THINK_END in content:
                content = content.split(THINK_END)[-1]
            turns.append(ASSISTANT + content + EOS)
        else:
            raise ValueError(f"unsupported chat role: {role} (use system, user or assistant)")
    text = bos_token + "\n\n".join(system) + "".join(turns)
    if add_generation_prompt:
        text += ASSISTANT + THINK_START + "\n"
    return text


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable-character table that byte-level BPE vocabularies are written in."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or a dict {"content": ...} (DeepSeek's style)."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, str):
        return value
    raise ValueError(f"cannot read special token {value!r} (expected a string or {{'content': ...}})")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template nanoseek needs."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = BOS,
        eos_token: str | None = EOS,
        pad_token: str | None = PAD,
        chat_template: str | None = R1_CHAT_TEMPLATE,
        add_bos_token: bool = True,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.config = dict(config or {})
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        vocab = backend.get_vocab(with_added_tokens=True)
        eos_token = eos_token or next((t for t in _EOS_CANDIDATES if t in vocab), None)
        if eos_token is None or eos_token not in vocab:
            raise ValueError(
                f"tokenizer has no end-of-sentence token (looked for {eos_token or _EOS_CANDIDATES})"
            )
        bos_token = bos_token or next((t for t in _BOS_CANDIDATES if t in vocab), None)
        # A vocabulary without BOS (Qwen, GPT-2 style) separates documents with its EOS instead.
        if bos_token is None or bos_token not in vocab:
            bos_token = eos_token
        pad_token = pad_token if pad_token in vocab else (PAD if PAD in vocab else eos_token)
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id: int = vocab[bos_token]
        self.eos_token_id: int = vocab[eos_token]
        self.pad_token_id: int = vocab[pad_token]
        self.think_start, self.think_end = THINK_START, THINK_END
        self.think_start_id: int | None = vocab.get(THINK_START)
        self.think_end_id: int | None = vocab.get(THINK_END)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        self._byte_table: list[bytes] | None = None
        self._byte_level: bool | None = None

    def __len__(self) -> int:
        return self.vocab_size

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # add_special_tokens=False: BOS is ours to add, whatever post-processor the file carries.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        # encode_batch_fast skips offset tracking (tokenizers >= 0.21); same ids.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        out = encode(list(texts), add_special_tokens=False)
        if add_bos:
            return [[self.bos_token_id, *e.ids] for e in out]
        return [e.ids for e in out]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(_as_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)

    @property
    def is_byte_level(self) -> bool:
        if self._byte_level is None:
            decoder = json.loads(self.backend.to_str()).get("decoder") or {}
            kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
            self._byte_level = kinds == ["ByteLevel"]
        return self._byte_level

    def token_bytes(self) -> list[bytes]:
        """The exact bytes each id decodes to (byte-level tokenizers only; added tokens as UTF-8)."""
        if not self.is_byte_level:
            raise ValueError("token_bytes() needs a byte-level tokenizer")
        if self._byte_table is None:
            table = [b""] * self.vocab_size
            for token, i in self.backend.get_vocab(with_added_tokens=False).items():
                try:
                    table[i] = bytes(_UNICODE_TO_BYTE[c] for c in token)
                except KeyError:  # not written in the byte alphabet: the decoder passes it through
                    table[i] = token.encode("utf-8")
            for i, tok in self.backend.get_added_tokens_decoder().items():
                if i < len(table):
                    table[i] = tok.content.encode("utf-8")
            self._byte_table = table
        return self._byte_table

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render a conversation as the model's prompt (the template already holds BOS)."""
        if self.chat_template is None or self.chat_template == R1_CHAT_TEMPLATE:
            text = render_r1_chat(messages, self.bos_token, add_generation_prompt)
        else:  # a template shipped with someone else's tokenizer: run it the way transformers does
            text = _render_jinja(
                self.chat_template,
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
            )
        return self.encode(text) if tokenize else text

    # ---------------------------------------------------------------- save
    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json (HF layout, loadable by AutoTokenizer)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        config = dict(self.config)
        config.update(
            {
                "tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"),
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "pad_token": self.pad_token,
                "add_bos_token": self.add_bos_token,
                "add_eos_token": False,
                # transformers' default space clean-up would break lossless decoding.
                "clean_up_tokenization_spaces": False,
                "model_max_length": config.get("model_max_length", 1 << 20),
            }
        )
        if config["tokenizer_class"] == "TokenizersBackend":  # transformers 5's name; 4.x knows this one
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
        for key in ("added_tokens_decoder", "is_local", "local_files_only", "backend"):
            config.pop(key, None)  # tokenizer.json is the source of truth; the rest is load-time state
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
            jinja = out / "chat_template.jinja"  # transformers 5 prefers this file: keep it in step
            if jinja.exists():
                jinja.write_text(self.chat_template)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return out

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"byte_level={self.is_byte_level})"
        )


class IncrementalDecoder:
    """Token ids in, text deltas out; a character split across tokens is held until it is complete.

    `push(ids)` returns the new text; `flush()` ends the stream (an unfinished character becomes U+FFFD).
    The concatenated deltas equal `tokenizer.decode(all_ids)` for valid text.
    """

    # Non-byte-level fallback: re-decode from a few tokens back so merges/spacing at the seam are right.
    _CONTEXT = 6

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._ids: list[int] = []
        if tokenizer.is_byte_level:
            self._table = tokenizer.token_bytes()
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._table = None
            self._prefix = 0  # ids before this index are only context
            self._read = 0  # text of ids[_prefix:_read] has been emitted

    def push(self, ids: int | Iterable[int]) -> str:
        new = _as_ids(ids)
        if self._table is not None:
            skip = self.tokenizer.special_token_ids if self.skip_special_tokens else frozenset()
            n = len(self._table)
            data = b"".join(self._table[i] for i in new if 0 <= i < n and i not in skip)
            delta = self._utf8.decode(data)
        else:
            self._ids.extend(new)
            delta = self._fallback(final=False)
        self.text += delta
        return delta

    def flush(self) -> str:
        delta = self._utf8.decode(b"", final=True) if self._table is not None else self._fallback(final=True)
        self.text += delta
        return delta

    def _fallback(self, final: bool) -> str:
        decode = self.tokenizer.decode
        skip = self.skip_special_tokens
        seen = decode(self._ids[self._prefix : self._read], skip_special_tokens=skip)
        full = decode(self._ids[self._prefix :], skip_special_tokens=skip)
        if not final and full.endswith("\ufffd"):
            return ""  # the last token ends mid-character: wait for the rest
        if len(full) <= len(seen):
            return ""
        delta = full[len(seen) :]
        self._read = len(self._ids)
        self._prefix = max(self._prefix, self._read - self._CONTEXT)
        return delta


def _as_ids(ids: Any) -> list[int]:
    """Token ids from an int, a list, a numpy array or a torch tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [ids] if isinstance(ids, int) else [int(i) for i in ids]


def _render_jinja(template: str, **context: Any) -> str:
    """Render a chat template with the same environment transformers uses (sandboxed Jinja)."""
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(**context)


# -------------------------------------------------------------------- training
def _build_backend() -> _Backend:
    backend = _Backend(models.BPE(byte_fallback=False))
    backend.normalizer = None  # lossless: no NFC/NFKC, no lowercasing
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def llama_cpp_pre_tokenizer(tok: Tokenizer) -> str | None:
    """The name llama.cpp knows this tokenizer's pre-tokenization by (`tokenizer.ggml.pre`), or None.

    llama.cpp does not read the regex from the file: it applies its own copy for a known name. So the
    name is only right when the file's pre-tokenizer is exactly what `_build_backend` writes (tokenizers
    trained before the switch to Qwen2's regex carry another one and must be retrained).
    """
    spec = json.loads(tok.backend.to_str())
    if spec.get("normalizer") is not None or (spec.get("model") or {}).get("type") != "BPE":
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    split, byte_level = steps
    ok = (
        split.get("type") == "Split"
        and split.get("pattern") == {"Regex": SPLIT_PATTERN}
        and split.get("behavior") == "Isolated"
        and not split.get("invert")
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("add_prefix_space")
        and not byte_level.get("use_regex")
    )
    return LLAMA_CPP_PRE if ok else None


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    *,
    max_token_length: int | None = 16,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on `texts`; the result has exactly `vocab_size` ids (specials included,
    unless the corpus is too small to learn that many merges)."""
    reserved = len(SPECIAL_TOKENS) + len(CHAT_TOKENS)
    if vocab_size < 256 + reserved + 1:
        raise ValueError(f"vocab_size must be at least {256 + reserved + 1} (256 bytes + special tokens)")
    backend = _build_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, normalized=False) for t in (*SPECIAL_TOKENS, *CHAT_TOKENS)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    # The trainer marks every reserved token special; DeepSeek keeps the chat tokens in decoded text.
    spec = json.loads(backend.to_str())
    for entry in spec["added_tokens"]:
        entry["special"] = entry["content"] in SPECIAL_TOKENS
    backend = _Backend.from_str(json.dumps(spec))
    bos_id = backend.token_to_id(BOS)
    # `AutoTokenizer(text)` adds BOS like DeepSeek's tokenizer; nanoseek's own encode never relies on it.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return Tokenizer(backend)


# -------------------------------------------------------------------- loading
def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer directory (tokenizer.json [+ tokenizer_config.json]) or a tokenizer.json file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p} (expected a directory with tokenizer.json)")
    if p.is_dir():
        file, directory = p / "tokenizer.json", p
        if not file.exists():
            others = sorted(x.name for x in p.iterdir() if "token" in x.name or x.suffix == ".model")
            hint = (
                f" (found {', '.join(others)}; only the fast-tokenizer format is supported)" if others else ""
            )
            raise FileNotFoundError(f"no tokenizer.json in {p}{hint}")
    else:
        file, directory = p, p.parent
    try:
        backend = _Backend.from_file(str(file))
    except Exception as e:  # the Rust error is a bare string; say which file
        raise ValueError(f"cannot read tokenizer {file}: {e}") from e
    config: dict[str, Any] = {}
    config_file = directory / "tokenizer_config.json"
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from e
    template = config.get("chat_template")
    if isinstance(template, list):  # older format: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    jinja_file = directory / "chat_template.jinja"  # where recent transformers versions save it
    if template is None and jinja_file.exists():
        template = jinja_file.read_text()
    if template is None and backend.token_to_id(USER) is not None:
        template = R1_CHAT_TEMPLATE  # DeepSeek vocabulary without a config: R1 format
    return Tokenizer(
        backend,
        bos_token=_token_content(config.get("bos_token")),
        eos_token=_token_content(config.get("eos_token")),
        pad_token=_token_content(config.get("pad_token")),
        chat_template=template,
        add_bos_token=bool(config.get("add_bos_token", True)),
        config={k: v for k, v in config.items() if k != "chat_template"},
    )


def tokenizer_summary(tok: Tokenizer, sample: Sequence[str]) -> str:
    """One line: vocab size and compression (characters per token) on a text sample."""
    start = time.perf_counter()
    ids = tok.encode_batch(list(sample))
    n_tok = sum(len(x) for x in ids) or 1
    n_chr = sum(len(s) for s in sample)
    return (
        f"vocab {tok.vocab_size}, {n_chr / n_tok:.2f} chars/token on {len(sample)} docs "
        f"({n_tok / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s)"
    )
