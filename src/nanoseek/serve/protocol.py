"""Request schemas of the OpenAI API subset nanoseek serves, and OpenAI-shaped errors.

Requests are validated with pydantic, but a failure is reported the way OpenAI reports it: status 400,
`{"error": {"message", "type": "invalid_request_error", "param": <the field>, "code"}}`, never
FastAPI's 422. Unknown fields are accepted and ignored (clients such as lm-evaluation-harness send
extras), as vLLM does, except fields that would change the output and are not implemented (`UNSUPPORTED`:
vLLM's extensions, OpenAI's audio output and web search): those are refused, naming the field. `null`
stands for the default of a field that cannot hold it, as OpenAI's spec has it (`"n": null` is n=1);
`max_tokens: null` is the checkpoint's generation_config.json max_new_tokens where it names one, else no
limit but the context's, as in vLLM.
"""

from __future__ import annotations

import types
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nanoseek.tokenizer import content_text


class APIError(Exception):
    """An error the client caused or must handle; rendered as OpenAI's error object."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic problem as a 400 naming the parameter (dotted path, e.g. messages.0.role)."""
    errors = e.errors()
    # A union reports every member's failure, `str` first: the one member that got deepest into the value is
    # the form the client sent (a content part whose text is no string was "content: should be a string")
    depths = [len(x.get("loc", ())) for x in errors]
    deepest = max(depths)
    err = errors[depths.index(deepest)] if depths.count(deepest) == 1 else errors[0]
    loc = [str(x) for x in err.get("loc", ()) if not str(x).startswith("function-")]
    # pydantic reports which union member failed ("str", "list[ContentPart]"); the client only needs the field.
    loc = [x for x in loc if x not in ("str", "int") and "[" not in x]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return APIError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    return APIError(f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's spec makes `n`, `stream`, `logprobs`, `echo`... nullable, and clients send `null` for
        "not set" (the openai client does for `n=None`): a field that cannot hold None takes its default."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or k not in fields or types.NoneType in get_args(fields[k].annotation)
        }


class StreamOptions(_Request):
    include_usage: bool = False
    # vLLM's: every chunk carries the usage so far (with include_usage); it was ignored, each chunk's null
    continuous_usage_stats: bool = False


class ContentPart(_Request):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text(self) -> ContentPart:
        """A text part without its text (a typo such as "content" for "text") was read as "", and the model
        answered an empty message: refused, as OpenAI refuses it."""
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs its 'text'")
        return self


class FunctionCall(_Request):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    # DeepSeek's API returns the reasoning apart; clients may send it back. R1's template drops it.
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result: which call it answers (required: Server.chat_messages)

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        """A content of another type (a number, an object) was "should be a valid string", as if only a
        string were taken: the 400 names the forms content may take."""
        if v is not None and not isinstance(v, str | list):
            raise ValueError(f"should be a string, a list of content parts or null, not {type(v).__name__}")
        return v

    def text(self, index: int) -> str:
        """The content as text; `index`: this message's place in `messages`, named by the 400 (a long
        history may hold one image part)."""
        try:
            return content_text(self.content)
        except ValueError as e:
            raise APIError(str(e), param=f"messages.{index}.content") from None


# Request fields that change the output and that this server does not implement -> their no-op value: vLLM's
# extensions, and OpenAI's audio output and web search (a text-only model without a search tool: OpenAI
# refuses them for such a model; ignored, the client waits for audio or citations that never come)
UNSUPPORTED: dict[str, Any] = {
    "modalities": ["text"],
    "audio": None,
    "web_search_options": None,
    "min_tokens": 0,
    "use_beam_search": False,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "allowed_token_ids": None,
    "bad_words": None,
    "truncate_prompt_tokens": None,
    "prompt_logprobs": None,
    "return_tokens_as_token_ids": False,  # logprobs' tokens as "token_id:N"
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "structured_outputs": None,
    "logits_processors": None,
    # vLLM's chat-template extensions: the prompt is always rendered with the checkpoint's template, ending in
    # a new assistant turn (an assistant prefill was closed and answered anew, as if the field were not sent)
    "add_generation_prompt": True,
    "continue_final_message": False,
    "chat_template": None,
    "documents": None,
    "echo": False,  # chat's: /v1/completions has its own
}


class _Sampling(_Request):
    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (load benchmarks)
    logit_bias: dict[str, float] | None = None  # token id (as a string, OpenAI's JSON keys) -> bias
    stop_token_ids: list[int] | None = None  # vLLM's extension: ids that end the reply besides EOS
    # vLLM's extension: prefix-cache isolation, only requests of the same salt share cached blocks (was
    # taken as an unknown field and ignored, a tenant relying on it isolated from nobody)
    cache_salt: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _unsupported(self) -> _Sampling:
        """Fields this server cannot honour are refused, never ignored: each would change the output. Their
        no-op values (what clients that send every field send) are accepted."""
        for name, noop in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value is not None and value != noop and value != []:
                raise APIError(f"'{name}' is not supported by this server.", param=name)
        # `is not None`, not truthiness: `{}`, `[]` or `0` (no format at all) passed as if no field were sent
        fmt = (self.model_extra or {}).get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise APIError("only response_format {'type': 'text'} is supported.", param="response_format")
        return self

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):  # OpenAI and vLLM refuse it too
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v: list[int] | None) -> list[int] | None:
        """A set of ids, kept in order: each repeat was checked again for every choice and looked up by the engine
        at every token (a million from a 3 MB body held the event loop at n = 64, then slowed every step)."""
        return None if v is None else list(dict.fromkeys(v))

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops


# OpenAI's values (gpt-5.1's "none" to gpt-5.1-codex-max's "xhigh"): a misspelt one was ignored, the reply thinking
# as if none were sent
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]

# A token count is an int64 in the APIs this one follows: a longer one (4300 digits) made the context-length
# 400's message unprintable (past Python's int-to-text limit), a 500.
MAX_TOKENS = 2**63 - 1


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}; checked by the server
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's way to pass template options: {"thinking": false} (DeepSeek-V3.1) or {"enable_thinking": false}
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None  # "none" is thinking off (Server.thinking)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and isinstance(v[0], list) and any(len(p) == 0 for p in v):
            raise ValueError("a token-id prompt must not be empty")
        return v


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # as the chat's: [] renders no turn
    # a text prompt: BOS as /v1/completions puts it there, so the count is what a request uses (vLLM's default)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    # with messages: rendered as the chat request would render them, so the counts agree
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]
