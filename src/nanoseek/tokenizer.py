"""Byte-level BPE tokenizer with DeepSeek's special tokens and the DeepSeek-R1 chat template.

What is notable:
- Byte-level BPE (Hugging Face `tokenizers`), no normalizer: every string round-trips exactly,
  whatever script or emoji it holds, and no input can be out of vocabulary (all 256 bytes are tokens).
- Pre-tokenization is Qwen2's split regex (GPT-4's with one token per digit): arithmetic sees place
  value the same way in every number, and a run of letters of any script (Chinese and Japanese
  included) is one piece. It is one of llama.cpp's known pre-tokenizers ("qwen2"), so a GGUF export
  tokenizes in llama.cpp exactly as here (`LLAMA_CPP_PRE`, `llama_cpp_pre_tokenizer`).
- DeepSeek's token strings: `<｜begin▁of▁sentence｜>`, `<｜end▁of▁sentence｜>`, `<｜▁pad▁｜>` are special
  (dropped by `skip_special_tokens`); `<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>` and the tool-call
  tokens (`<｜tool▁calls▁begin｜>` ...) are single-id added tokens that stay in decoded text, as in
  DeepSeek's own tokenizer. Tokenizers trained before the tool tokens existed still load and chat;
  only tool use asks for them (`Tokenizer.require_tool_tokens`).
- The chat template is R1-0528's (system text first, then `<｜User｜>q<｜Assistant｜>a<｜end▁of▁sentence｜>`)
  with DeepSeek-V3.1's additions: a non-thinking generation prompt (`<｜Assistant｜></think>`), tool
  descriptions appended to the system prompt, assistant tool calls
  (`<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS_JSON<｜tool▁call▁end｜><｜tool▁calls▁end｜>`) and
  tool results (`<｜tool▁output▁begin｜>...<｜tool▁output▁end｜>`). It is implemented twice: in Python
  (`render_chat`, what nanoseek runs; `parse_tool_calls` is its inverse for generated calls) and as the
  Jinja `chat_template` saved to `tokenizer_config.json` (what `transformers` runs); tests check they agree.
  Assistant turns in history lose their `<think>...</think>` part, as R1 does, and the newlines after
  it: history reads as the server's `content` that clients send back, however the turn was stored.
- `IncrementalDecoder` turns a stream of token ids into text deltas that never split a UTF-8 character:
  for byte-level tokenizers it works on the bytes themselves, otherwise it re-decodes a short suffix.
- `load_tokenizer` reads any HF `tokenizer.json` (+ `tokenizer_config.json`, DeepSeek's included).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, overload

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend

from nanoseek.atomic import atomic_file, atomic_write, directory_to_read
from nanoseek.config import ModelConfig, read_json_object

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
# DeepSeek-V3.1's tool-call tokens (the same strings as DeepSeek's vocabulary).
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
# Special tokens are control-only and vanish under skip_special_tokens; the chat-structure tokens are
# single ids too but are kept in decoded text (DeepSeek marks them special=false), so a completion's
# "<think>...</think>" survives decoding for the reward functions.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD)
CHAT_TOKENS: tuple[str, ...] = (USER, ASSISTANT, THINK_START, THINK_END)
TOOL_TOKENS: tuple[str, ...] = (
    TOOL_CALLS_BEGIN,
    TOOL_CALLS_END,
    TOOL_CALL_BEGIN,
    TOOL_CALL_END,
    TOOL_SEP,
    TOOL_OUTPUT_BEGIN,
    TOOL_OUTPUT_END,
)

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

# The tool description appended to the system prompt, in the layout of DeepSeek-V3.1's model card
# ("## Tools", one "### name" section per tool with its JSON-Schema parameters, then the call format).
TOOLS_HEADER = "## Tools\nYou can call the following tools:\n"
TOOLS_FOOTER = (
    "\nTo call tools, answer in exactly this format:\n"
    f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}tool_name{TOOL_SEP}arguments_json{TOOL_CALL_END}"
    f"{{more_tool_calls}}{TOOL_CALLS_END}\n\n"
    "- tool_name is exactly one of the tools above\n"
    "- arguments_json is one valid JSON object that follows the tool's Parameters schema\n"
    "- several calls follow each other directly, with nothing between them\n"
)


def _jinja_str(text: str) -> str:
    """`text` as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# The chat template as Jinja (what transformers runs). `render_chat` below is the Python twin; keep the
# two in step. `thinking` (or vLLM's `enable_thinking`) picks the generation prompt; default on.
R1_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% if thinking is not defined %}{% set thinking = enable_thinking if enable_thinking is defined "
    "else true %}{% endif %}"
    "{% set ns = namespace(system_prompt='', is_first_sp=true, after_tool=false) %}"
    "{%- for message in messages %}{%- if message['role'] in ['system', 'developer'] %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}"
    "{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}"
    "{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if tools %}{% set tns = namespace(text=" + _jinja_str(TOOLS_HEADER) + ") %}"
    "{%- for tool in tools %}{% set f = tool['function'] %}"
    "{% set tns.text = tns.text + '\\n### ' + f['name'] + '\\nDescription: ' + (f['description'] or '')"
    " + '\\n\\nParameters: ' + ((f['parameters'] or {}) | tojson) + '\\n' %}{%- endfor %}"
    "{% set tns.text = tns.text + " + _jinja_str(TOOLS_FOOTER) + " %}"
    "{%- if ns.is_first_sp %}{% set ns.system_prompt = tns.text %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + tns.text %}{%- endif %}"
    "{%- endif %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{% set ns.after_tool = false %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] or '' %}"
    "{%- if '</think>' in content %}{% set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{% endif %}"
    "{%- if not ns.after_tool %}{{ '<｜Assistant｜>' }}{% endif %}{{ content }}"
    "{%- if message['tool_calls'] %}{{ '<｜tool▁calls▁begin｜>' }}"
    "{%- for call in message['tool_calls'] %}{% set args = call['function']['arguments'] %}"
    "{%- if args is not defined or args is none %}{% set args = '{}' %}{% endif %}"
    "{{ '<｜tool▁call▁begin｜>' + call['function']['name'] + '<｜tool▁sep｜>' }}"
    "{{ args if args is string else (args | tojson) }}{{ '<｜tool▁call▁end｜>' }}"
    "{%- endfor %}{{ '<｜tool▁calls▁end｜>' }}{%- endif %}"
    "{{ '<｜end▁of▁sentence｜>' }}{% set ns.after_tool = false %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{ '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}{% set ns.after_tool = true %}"
    "{%- elif message['role'] not in ['system', 'developer'] %}"
    "{{ raise_exception('unsupported chat role: ' + message['role']) }}"
    "{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt and not ns.after_tool %}"
    "{{ '<｜Assistant｜>' + ('<think>\\n' if thinking else '</think>') }}{% endif %}"
)
# Fallbacks for tokenizer.json files that come without a tokenizer_config.json.
_BOS_CANDIDATES = (BOS, "<s>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
_EOS_CANDIDATES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


# sha256 of earlier versions of R1_CHAT_TEMPLATE, as saved in tokenizer_config.json by older nanoseek:
# such a tokenizer is ours, so it renders with `render_chat` (and is saved with the current template).
_OLDER_TEMPLATES = frozenset(
    {
        "8263e33f086dd932fe1c3e51c6eed33c7f7f4161a4107fec84ecd4637c9dcf9c",
        "5e7a91c42d924ec855e6c815afeb4a8a35f9f7a5ceaafb927d360b11cfeff45b",  # kept the newlines after </think>
        "4e1f5165f49c72c4ff89ebd37819353c52409e137483264bed1bafa0736a94e3",  # refused the developer role
        "6fb97d918aa7278210f0465d30a0115708144313a85c87a955a766e591d22f03",  # failed on a call without arguments
    }
)


def _is_ours(template: str | None) -> bool:
    if template is None or template == R1_CHAT_TEMPLATE:
        return True
    return hashlib.sha256(template.encode()).hexdigest() in _OLDER_TEMPLATES


def render_chat(
    messages: Sequence[dict[str, Any]],
    bos_token: str = BOS,
    add_generation_prompt: bool = True,
    *,
    thinking: bool = True,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The prompt: BOS + system text (+ tool descriptions), then the turns, then the generation prompt.

    Turns: `<｜User｜>q`, `<｜Assistant｜>a[tool calls]<｜end▁of▁sentence｜>`, `<｜tool▁output▁begin｜>r<｜tool▁output▁end｜>`.
    Assistant history keeps only what follows `</think>`, without its leading newlines (R1 drops past
    reasoning; `reasoning_content` is ignored): the answer alone, as the server returns it as `content` and
    clients send it back, whether the turn was stored as `...</think>\\n\\nanswer` or as `answer`. The
    generation prompt is `<｜Assistant｜><think>\\n` (thinking, R1's) or `<｜Assistant｜></think>` (V3.1's
    non-thinking mode). After tool results there is none: the model goes on with the same turn
    (V3.1), so the assistant message that follows a tool result has no `<｜Assistant｜>` of its own.
    """
    system: list[str] = []
    turns: list[str] = []
    after_tool = False
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
        if role in ("system", "developer"):  # OpenAI's newer name; vLLM passes it to the template as is
            system.append(content)
        elif role == "user":
            turns.append(USER + content)
            after_tool = False
        elif role == "assistant":
            if THINK_END in content:
                content = content.split(THINK_END)[-1].lstrip("\n")
            calls = message.get("tool_calls")
            head = "" if after_tool else ASSISTANT
            turns.append(head + content + (render_tool_calls(calls, i) if calls else "") + EOS)
            after_tool = False
        elif role == "tool":
            turns.append(TOOL_OUTPUT_BEGIN + content + TOOL_OUTPUT_END)
            after_tool = True
        else:
            raise ValueError(
                f"unsupported chat role: {role} (use system, developer, user, assistant or tool)"
            )
    if tools:
        system.append(render_tools(tools))
    text = bos_token + "\n\n".join(system) + "".join(turns)
    if add_generation_prompt and not after_tool:
        text += ASSISTANT + (THINK_START + "\n" if thinking else THINK_END)
    return text


def render_tools(tools: Sequence[dict[str, Any]]) -> str:
    """OpenAI `tools` ([{"type": "function", "function": {name, description, parameters}}]) as the
    system prompt's tool section."""
    parts = [TOOLS_HEADER]
    for i, tool in enumerate(tools):
        f = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(f, dict)
            or tool.get("type", "function") != "function"
            or not _is_name(f.get("name"))
        ):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        # (a number was written as its digits, where the saved template fails in transformers)
        if not isinstance(f.get("description") or "", str):
            raise ValueError(
                f"tools[{i}]: description must be a string, got {type(f['description']).__name__}"
            )
        params = json.dumps(f.get("parameters") or {}, ensure_ascii=False)
        parts.append(
            f"\n### {f['name']}\nDescription: {f.get('description') or ''}\n\nParameters: {params}\n"
        )
    parts.append(TOOLS_FOOTER)
    return "".join(parts)


def _is_name(name: Any) -> bool:
    """A tool's or call's name: a non-empty string (a number was written as its digits, where the saved
    template fails in transformers)."""
    return isinstance(name, str) and name != ""


def content_text(content: Any) -> str:
    """An OpenAI message's content as the template's text: a string, None (""), or a list of content
    parts (dicts or objects with `type` and `text`) joined by newlines, as vLLM and llama.cpp's server
    join them for a template that takes string content (this one); a part that is not text is refused. An
    assistant's `refusal` part (OpenAI's assistant content is text and refusal parts) is its text, as vLLM
    reads it."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(f"content must be a string or a list of text parts, got {type(content).__name__}")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
        key = "refusal" if kind == "refusal" else "text"
        text = part.get(key) if isinstance(part, dict) else getattr(part, key, None)
        if kind not in ("text", "refusal"):
            raise ValueError(f"content part type {kind!r} is not supported (text only)")
        if text is not None and not isinstance(text, str):  # (a number was a TypeError from the join)
            raise ValueError(f"content part {key!r} must be a string, got {type(text).__name__}")
        texts.append(text or "")
    return "\n".join(texts)


def openai_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat message as the chat templates take it: `developer` (OpenAI's newer name) is the
    system role, content parts are joined into text, and `reasoning` is `reasoning_content`. `serve` and
    `sft` both read messages this way."""
    out = {**message, "role": "system" if message.get("role") == "developer" else message.get("role")}
    if "content" in message and message["content"] is not None:
        out["content"] = content_text(message["content"])
    if "reasoning_content" not in message and isinstance(message.get("reasoning"), str):
        # DeepSeek's API names it reasoning_content; vLLM (vllm-project/vllm#27752) and OpenRouter return
        # `reasoning`: chats saved from them lost their reasoning, trained as an empty think block
        out["reasoning_content"] = out.pop("reasoning")
    return out


def writes_fenced_tool_calls(chat_template: str | None) -> bool:
    """Whether `chat_template` writes an assistant's calls as DeepSeek-V3's and R1's templates do (R1-Distill's
    too): `function<｜tool▁sep｜>NAME`, then the arguments fenced as ```json, one call a line. nanoseek's own
    template writes V3.1's `NAME<｜tool▁sep｜>ARGS`."""
    return "```json" in (chat_template or "")


def render_tool_calls(
    calls: Sequence[dict[str, Any]], message_index: int = 0, *, fenced: bool = False
) -> str:
    """An assistant's OpenAI `tool_calls` in DeepSeek's format (arguments as the JSON text given): V3.1's,
    or with `fenced` V3's and R1's (`writes_fenced_tool_calls`)."""
    if not isinstance(calls, list | tuple):  # (a dict was read as its keys, an int was a TypeError)
        raise ValueError(
            f"chat message {message_index}: tool_calls must be a list, got {type(calls).__name__}"
        )
    out = [TOOL_CALLS_BEGIN]
    for j, call in enumerate(calls):
        f = call.get("function") if isinstance(call, dict) else None
        if not isinstance(f, dict) or not _is_name(f.get("name")):
            raise ValueError(f"chat message {message_index}: tool_calls[{j}] needs function.name (a string)")
        args = f.get("arguments")
        args = "{}" if args is None else args  # OpenAI's clients may leave a call's arguments out (or null)
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        if fenced:
            call = f"function{TOOL_SEP}{f['name']}\n```json\n{args}\n```"
            out.append(("\n" if j else "") + TOOL_CALL_BEGIN + call + TOOL_CALL_END)
        else:
            out.append(f"{TOOL_CALL_BEGIN}{f['name']}{TOOL_SEP}{args}{TOOL_CALL_END}")
    out.append(TOOL_CALLS_END)
    return "".join(out)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def call_arguments_ok(args: str) -> bool:
    """Whether a tool call's arguments text is one JSON object, as OpenAI's clients read it: NaN and Infinity
    are Python's, not JSON (a client's JSON.parse failed on them), and arguments nested deeper than the JSON
    decoder goes (a model looping on "[") are no object either (raised, a whole reply was a 500)."""
    try:
        return isinstance(json.loads(args, parse_constant=_not_json), dict)
    except (ValueError, RecursionError):
        return False


def parse_tool_calls(text: str, names: Iterable[str] | None = None) -> tuple[str, list[dict]] | None:
    """Generated text -> (content before the calls, [{"type": "function", "function": {name, arguments}}]).

    The inverse of `render_tool_calls` (V3.1's calls) and of DeepSeek-V3's and R1's templates (a call
    `function<｜tool▁sep｜>NAME` then its arguments fenced as ```json); whitespace between and around the
    calls is allowed. None when the text holds no tool-call block or a malformed one (unclosed, arguments
    that are not one JSON object, a name not in `names`, other text between the calls or after the block):
    the caller then treats the whole text as a plain answer.
    """
    start = text.find(TOOL_CALLS_BEGIN)
    if start < 0:
        return None
    body, end_tag, rest = text[start + len(TOOL_CALLS_BEGIN) :].partition(TOOL_CALLS_END)
    if not end_tag or rest.strip():
        return None
    allowed = set(names) if names is not None else None
    calls = []
    body = body.strip()
    if not body.endswith(TOOL_CALL_END):
        return None
    # V3.1 chains calls with nothing between; V3's template (and models trained on it) put a newline
    for piece in body.split(TOOL_CALL_END)[:-1]:
        piece = piece.lstrip()
        if not piece.startswith(TOOL_CALL_BEGIN):
            return None
        name, sep, args = piece[len(TOOL_CALL_BEGIN) :].partition(TOOL_SEP)
        name, args = name.strip(), args.strip()
        if name == "function" and args.endswith("```"):
            # DeepSeek-V3's and R1's format (their templates, R1-Distill's too): the call's type before the
            # separator, the name on the line after it, then the arguments fenced as ```json. Read as
            # V3.1's, such a checkpoint's every call came back as text
            name, _, fenced = args.partition("\n")
            fenced = fenced.strip().removeprefix("```json").removeprefix("```")
            name, args = name.strip(), fenced.removesuffix("```").strip()
        if not sep or not name or (allowed is not None and name not in allowed):
            return None
        if not call_arguments_ok(args):
            return None
        calls.append({"type": "function", "function": {"name": name, "arguments": args}})
    return (text[:start], calls) if calls else None


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
        generation_config: dict[str, Any] | None = None,
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
        named = bos_token is not None
        bos_token = bos_token or next((t for t in _BOS_CANDIDATES if t in vocab), None)
        # A vocabulary without BOS (Qwen, GPT-2 style) separates documents with its EOS instead, or
        # with its end-of-text token beside a chat EOS (Qwen2.5-Instruct's <|im_end|>, whose
        # tokenizer_config.json says "bos_token": null), and a prompt starts with no such token (as
        # transformers encodes it).
        if bos_token is None or bos_token not in vocab:
            bos_token = eos_token
        if bos_token == eos_token or (not named and bos_token == "<|endoftext|>"):
            self.add_bos_token = False
        # the BOS the config names, None where it says `"bos_token": null` (Qwen2.5's): transformers gives a
        # chat template none (`{{ bos_token }}` rendered the end-of-text token here), and a save keeps the null
        self.named_bos_token: str | None = (
            None if "bos_token" in self.config and self.config["bos_token"] is None else bos_token
        )
        pad_token = pad_token if pad_token in vocab else (PAD if PAD in vocab else eos_token)
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_token_id: int = vocab[bos_token]
        self.eos_token_id: int = vocab[eos_token]
        self.pad_token_id: int = vocab[pad_token]
        # What ends a generation: EOS, and the other ids a checkpoint's generation_config.json names
        # (Llama 3.1's <|eom_id|>, Qwen2.5-Instruct's <|endoftext|> beside <|im_end|>), as transformers'
        # generate and vLLM stop on them.
        # `generation_config`: the checkpoint's generation_config.json, which the training stages carry
        # into what they save (its sampling defaults, its end ids)
        self.generation_config: dict[str, Any] = dict(generation_config or {})
        listed = self.generation_config.get("eos_token_id")
        listed = listed if isinstance(listed, list) else [listed]
        size = backend.get_vocab_size(with_added_tokens=True)
        extra = [
            i
            for i in listed
            if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size and i != self.eos_token_id
        ]
        self.stop_token_ids: tuple[int, ...] = (self.eos_token_id, *dict.fromkeys(extra))
        self.think_start, self.think_end = THINK_START, THINK_END
        self.think_start_id: int | None = vocab.get(THINK_START)
        self.think_end_id: int | None = vocab.get(THINK_END)
        # Tokenizers trained before the tool tokens existed lack them: fine until a request uses tools.
        self.missing_tool_tokens: tuple[str, ...] = tuple(t for t in TOOL_TOKENS if t not in vocab)
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
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            _check_text(text)
            raise
        return [self.bos_token_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        # encode_batch_fast skips offset tracking (tokenizers >= 0.21); same ids.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        try:
            out = encode(list(texts), add_special_tokens=False)
        except TypeError:
            for t in texts:
                _check_text(t)
            raise
        if add_bos:
            return [[self.bos_token_id, *e.ids] for e in out]
        return [e.ids for e in out]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(_as_ids(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def incremental_decoder(
        self, skip_special_tokens: bool = False, context: Sequence[int] = ()
    ) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens, context=context)

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
    @overload
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: Literal[False] = False,
        *,
        thinking: bool | None = None,
        enable_thinking: bool | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: Literal[True] = ...,
        *,
        thinking: bool | None = None,
        enable_thinking: bool | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = ...,
        *,
        thinking: bool | None = None,
        enable_thinking: bool | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str | list[int]: ...

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        *,
        thinking: bool | None = None,
        enable_thinking: bool | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str | list[int]:
        """Render a conversation as the model's prompt (the template already holds BOS).

        `thinking=False` is V3.1's non-thinking mode (`enable_thinking`, vLLM's and Qwen3's name, is the same
        switch; `thinking` wins where both are given, as in the template); on by default. `tools` are OpenAI
        function tools. Tool use (tools, assistant `tool_calls`, `tool` messages) in R1's template needs the
        tool-call tokens in the vocabulary; another family's template renders them its own way.
        """
        # transformers passes any keyword to the template: `enable_thinking=False` was a TypeError here
        thinking = thinking if thinking is not None else enable_thinking is not False
        # DeepSeek's tool markup is R1's template's; another family's template writes its own (Qwen2.5's
        # <tool_call> text), which needs no such tokens
        if self.chat_template == R1_CHAT_TEMPLATE and (
            tools
            or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages if isinstance(m, dict))
        ):
            self.require_tool_tokens()
        if _is_ours(self.chat_template):
            text = render_chat(
                messages, self.bos_token, add_generation_prompt, thinking=thinking, tools=tools
            )
        else:  # a template shipped with someone else's tokenizer: run it the way transformers does
            # transformers drops a message's null fields (the OpenAI SDK's model_dump writes "tool_calls":
            # null): Llama 3.1's template reads `'tool_calls' in message` and failed on them. A null content
            # stays, which R1-Distill's template tests (`content is none`) for a turn of tool calls alone.
            messages = [
                {k: v for k, v in m.items() if v is not None or k == "content"} if isinstance(m, dict) else m
                for m in messages
            ]
            bos = {} if self.named_bos_token is None else {"bos_token": self.named_bos_token}
            assert self.chat_template is not None  # (no template renders as ours, above)
            text = _render_jinja(
                self.chat_template,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **bos,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
                tools=list(tools) if tools else None,
                # DeepSeek-V3.1's template reads `thinking`, vLLM users' templates `enable_thinking`.
                thinking=thinking,
                enable_thinking=thinking,
            )
        return self.encode(text) if tokenize else text

    def require_tool_tokens(self) -> None:
        """A clear error instead of tool-call markup spelled out byte by byte by a vocabulary without it."""
        if self.missing_tool_tokens and self.chat_template != R1_CHAT_TEMPLATE:
            raise ValueError(
                "this model's chat template is another family's, and nanoseek parses tool calls in DeepSeek's "
                f"format only (its tokens {', '.join(self.missing_tool_tokens)} are not in this vocabulary)"
            )
        if self.missing_tool_tokens:
            raise ValueError(
                f"this tokenizer has no tool-call tokens ({', '.join(self.missing_tool_tokens)}): it was trained "
                "before nanoseek added them, so the model cannot use tools. Retrain the tokenizer "
                "(nanoseek tokenizer) to get them."
            )

    # ---------------------------------------------------------------- save
    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json (HF layout, loadable by AutoTokenizer)."""
        # each file replaced whole (a kill mid-write leaves the old file or the new one, never a torn one)
        out = Path(directory)
        with atomic_file(out / "tokenizer.json") as tmp:
            self.backend.save(str(tmp))
        config = dict(self.config)
        config.update(
            {
                "tokenizer_class": config.get("tokenizer_class", "PreTrainedTokenizerFast"),
                "bos_token": self.named_bos_token,
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
                atomic_write(jinja, self.chat_template)
        atomic_write(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        return out

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"byte_level={self.is_byte_level})"
        )


class IncrementalDecoder:
    """Token ids in, text deltas out; a character split across tokens is held until it is complete.

    `push(ids)` returns the new text; `flush()` ends the stream (an unfinished character becomes U+FFFD,
    or with `drop_partial` is left out, as vLLM's detokenizer leaves it). The concatenated deltas equal
    `tokenizer.decode(all_ids)` for valid text; `text` is their concatenation and `chars` its length (read
    per token without joining the text: a prompt of 100k tokens scored with echo stays linear). `context`: the ids before
    the first pushed one (a prompt), whose text is not output; a non-byte-level decoder that strips a
    text's leading space (SentencePiece's) then keeps the first generated word's, as vLLM primes its
    detokenizer with the prompt.
    """

    # Non-byte-level fallback: re-decode from a few tokens back so merges/spacing at the seam are right.
    _CONTEXT = 6

    def __init__(
        self, tokenizer: Tokenizer, skip_special_tokens: bool = False, context: Sequence[int] = ()
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._pieces: list[str] = []  # the text's deltas, joined when `text` is read
        self.chars = 0
        self._ids: list[int] = []
        if tokenizer.is_byte_level:
            self._table: list[bytes] | None = tokenizer.token_bytes()
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._table = None
            self._ids = _as_ids(context)[-self._CONTEXT :]
            self._prefix = 0  # ids before this index are only context
            self._read = len(self._ids)  # text of ids[_prefix:_read] has been emitted (or is context)

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
        return self._add(delta)

    def flush(self, drop_partial: bool = False) -> str:
        if self._table is None:
            delta = self._fallback(final=True)
            return self._add(delta.rstrip("\ufffd") if drop_partial else delta)
        held, _ = self._utf8.getstate()
        # the held bytes are the start of a character, nothing more; but CPython's decoder also holds
        # ED A0..BF, a surrogate's first two bytes that no byte completes: decode() shows them as two U+FFFDs
        if drop_partial and not (held[:1] == b"\xed" and held[1:2] >= b"\xa0"):
            self._utf8.reset()
            return ""
        return self._add(self._utf8.decode(b"", final=True))

    @property
    def text(self) -> str:
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _add(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
            self.chars += len(delta)
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
        # The next window starts _CONTEXT ids back, but not inside a character spelled in byte tokens
        # (SentencePiece's byte fallback): a run of bytes cut mid-character decodes to one U+FFFD per
        # byte, and the next delta was those instead of the character (a ZWJ emoji came out as "����").
        # A window is whole when its text ends the text decoded now.
        start = max(self._prefix, self._read - self._CONTEXT)
        while start > self._prefix and not full.endswith(
            decode(self._ids[start : self._read], skip_special_tokens=skip)
        ):
            start -= 1
        self._prefix = start
        return delta


def _check_text(text: Any) -> None:
    """A clear ValueError for what the Rust tokenizer refuses with a bare TypeError: a str holding a
    lone surrogate (undecodable bytes read with surrogateescape, a JSON "\\ud83d" escape)."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"text is not valid Unicode: lone surrogate U+{ord(text[e.start]):04X} at character {e.start} "
                "(undecodable bytes, or a JSON \\uD800-\\uDFFF escape without its pair)"
            ) from None


def _as_ids(ids: Any) -> list[int]:
    """Token ids from an int, a list, a numpy array or a torch tensor. A negative id (a -100 label left
    in) is refused by value: the Rust decoder said only "number too small to fit in target type"."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    out = [ids] if isinstance(ids, int) else [int(i) for i in ids]
    if out and min(out) < 0:
        raise ValueError(f"token ids must be >= 0, got {min(out)}")
    return out


def _render_jinja(template: str, **context: Any) -> str:
    """Render a chat template with the same environment transformers uses (sandboxed Jinja)."""
    from datetime import datetime

    from jinja2.exceptions import UndefinedError
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    class Generation(Extension):
        """transformers' `{% generation %}...{% endgeneration %}` (marks the assistant's tokens for its
        masks): the text between, as transformers renders it."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, Generation]
    )
    env.filters["tojson"] = tojson  # transformers' own: Kimi's templates write tojson(separators=(',', ':'))
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    compiled = env.from_string(template)
    try:
        return compiled.render(**context)
    except (UndefinedError, TypeError) as e:  # the messages lack what it needs (say, a tool's description)
        raise ValueError(f"chat template: cannot render these messages: {e}") from None


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


def _interruptible(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` on a worker thread the main thread waits for. BPE training runs in Rust,
    which never looks at Python's signals: Ctrl-C on a large corpus landed only when training ended."""
    import threading

    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # raised again on the caller's thread
            outcome["error"] = e

    worker = threading.Thread(target=work, name="nanoseek-tokenizer-training", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)  # a signal's handler runs between these waits
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


# The longest run the trainer sees whole: a piece of the split regex (a run of letters, symbols or spaces)
# longer than this is cut into pieces of this length for training. BPE training time grows faster than
# linearly in a piece's length: one long run of letters without a space or digit (DNA, base64, minified
# code) stalled training on a corpus of a few MB. No token is anywhere near as long, so the cuts cost
# only the pairs across them.
_TRAIN_PIECE_CHARS = 1000


def _cut_long_pieces(texts: Iterable[str]) -> Iterable[str]:
    """`texts`, each piece of the split regex longer than `_TRAIN_PIECE_CHARS` cut into separate texts of
    that length; a text without such a run (all of an ordinary corpus) is passed on as it is."""
    import re

    # a quick test first, tried at the start of each run of blanks or non-blanks only (linear time). Half
    # the limit: a piece of symbols then newlines ("!!!\r\n\r\n...") is one piece of two such runs, and
    # went to the trainer whole at up to twice the limit when neither run reached it
    half = _TRAIN_PIECE_CHARS // 2
    run = re.compile(rf"(?<!\S)\S{{{half}}}|(?<!\s)\s{{{half}}}")
    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    for text in texts:
        if not run.search(text):
            yield text
            continue
        start = 0  # the text is cut inside each long piece; what lies between goes on unchanged
        for _, (begin, end) in split.pre_tokenize_str(text):
            if end - begin > _TRAIN_PIECE_CHARS:
                yield text[start:begin]
                yield from (
                    text[i : min(i + _TRAIN_PIECE_CHARS, end)] for i in range(begin, end, _TRAIN_PIECE_CHARS)
                )
                start = end
        yield text[start:]


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
    reserved = len(SPECIAL_TOKENS) + len(CHAT_TOKENS) + len(TOOL_TOKENS)
    if vocab_size < 256 + reserved + 1:
        raise ValueError(f"vocab_size must be at least {256 + reserved + 1} (256 bytes + special tokens)")
    if min_frequency < 0:  # (the trainer's own error is an OverflowError about an unsigned int)
        raise ValueError(f"min_frequency must be 0 or more, got {min_frequency}")
    backend = _build_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TOKENS),  # the tool tokens go last, below
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, normalized=False) for t in (*SPECIAL_TOKENS, *CHAT_TOKENS)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_length,
        show_progress=show_progress,
    )
    _interruptible(backend.train_from_iterator, _cut_long_pieces(texts), trainer=trainer)
    # The trainer marks every reserved token special; DeepSeek keeps the chat tokens in decoded text.
    spec = json.loads(backend.to_str())
    for entry in spec["added_tokens"]:
        entry["special"] = entry["content"] in SPECIAL_TOKENS
    backend = _Backend.from_str(json.dumps(spec))
    # Appended after the merges, as DeepSeek's own vocabulary holds them: the ids of everything else
    # stay where tokenizers trained before the tool tokens had them.
    backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in TOOL_TOKENS])
    bos_id = backend.token_to_id(BOS)
    # `AutoTokenizer(text)` adds BOS like DeepSeek's tokenizer; nanoseek's own encode never relies on it.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return Tokenizer(backend)


def tokens_moved(tok: Tokenizer, other: Tokenizer) -> list[str]:
    """`tok`'s tokens (added ones too) that `other` does not hold at the same id, in id order: [] when
    `other` reads every id of `tok` as `tok` does."""
    theirs = other.backend.get_vocab(with_added_tokens=True)
    ours = tok.backend.get_vocab(with_added_tokens=True)
    return sorted((t for t, i in ours.items() if theirs.get(t) != i), key=ours.__getitem__)


# -------------------------------------------------------------------- loading
def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer directory (tokenizer.json [+ tokenizer_config.json]), a tokenizer.json file, or
    a Hugging Face Hub name (owner/name), fetched as `load_model` fetches it (`resolve_checkpoint`)."""
    # `~` and a checkpoint a save left aside mid-swap, as `load_model` reads the same directory
    p = directory_to_read(Path(path).expanduser())
    if not p.exists():
        from nanoseek.checkpoint import is_hub_name, resolve_checkpoint  # torch: only for a Hub name

        if is_hub_name(path):
            p = resolve_checkpoint(path, tokenizer=True)  # AutoTokenizer.from_pretrained takes one too
    if not p.exists():
        raise FileNotFoundError(f"tokenizer not found: {p} (expected a directory with tokenizer.json)")
    if p.is_dir():
        file, directory = p / "tokenizer.json", p
        if not file.exists():
            # a run directory (RUN/tokenizer/, RUN/pretrain/ hold one): the folder was named as a slow
            # tokenizer's file, "only the fast-tokenizer format is supported", which it is in
            inside = sorted(str(x) for x in p.iterdir() if (x / "tokenizer.json").is_file())
            others = sorted(
                x.name for x in p.iterdir() if ("token" in x.name or x.suffix == ".model") and not x.is_dir()
            )
            hint = (
                f" (a directory inside has one: {', '.join(inside)})"
                if inside
                else f" (found {', '.join(others)}; only the fast-tokenizer format is supported)"
                if others
                else ""
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
        config = read_json_object(config_file)
    template = config.get("chat_template")
    if isinstance(template, list):  # older format: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    # where recent transformers versions save it; like transformers, read it over the config's entry
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.exists():
        try:
            template = jinja_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:  # the codec's error alone named no file
            raise ValueError(f"{jinja_file} is not UTF-8 text: {e}") from None
    if template is None and backend.token_to_id(USER) is not None:
        template = R1_CHAT_TEMPLATE  # DeepSeek vocabulary without a config: R1 format
    elif template is not None and _is_ours(template):
        template = R1_CHAT_TEMPLATE  # an older nanoseek template: the current one renders it the same
    return Tokenizer(
        backend,
        generation_config=_generation_config(directory),
        bos_token=_token_content(config.get("bos_token")),
        eos_token=_token_content(config.get("eos_token")),
        pad_token=_token_content(config.get("pad_token")),
        chat_template=template,
        # `"bos_token": null` (Qwen2.5's) says the vocabulary has none: nothing goes before a prompt, as
        # transformers encodes it, though a candidate such as <|endoftext|> still separates documents
        add_bos_token=bool(config.get("add_bos_token", config.get("bos_token", "") is not None)),
        config={k: v for k, v in config.items() if k != "chat_template"},
    )


def checkpoint_tokenizer(directory: Path, config: ModelConfig | None = None) -> Tokenizer:
    """Checkpoint directory `directory`'s tokenizer, refused where it has more tokens than the model's
    vocab_size (`config`, else config.json's): said before the weights load. Such a pair (another model's
    tokenizer.json, a config.json edited down) loaded without complaint, and the model then met ids it
    has no embedding for only when a prompt used one, and could never sample them. A vocab_size larger
    than the tokenizer is normal (DeepSeek's and Qwen's are padded to a multiple of 64 or 128)."""
    tokenizer = load_tokenizer(directory)
    vocab_size = (config or ModelConfig.load(directory)).vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"{directory / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model's vocab_size "
            f"({directory / 'config.json'}) is {vocab_size}: the ids from {vocab_size} on have no embedding. "
            "The tokenizer is another model's, or config.json was edited: use the "
            "tokenizer the model was trained with"
        )
    return tokenizer


def _generation_config(directory: Path) -> dict[str, Any]:
    """A checkpoint's generation_config.json ({} where it has none)."""
    path = directory / "generation_config.json"
    return read_json_object(path) if path.exists() else {}


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
