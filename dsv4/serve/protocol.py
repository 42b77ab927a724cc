"""The OpenAI API's request and response bodies as pydantic models (the subset `dsv4 serve` implements), so that
every request is validated before it reaches the engine and /openapi.json describes exactly what is accepted.

Limits that the OpenAI API documents are enforced here (temperature in [0, 2], at most 4 stop sequences, ...);
limits that depend on the model (context length) are checked by the server, which knows it.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8  # completions per request
MAX_TOKENS = 1 << 20  # an upper bound on any token count a request may ask for; the context is checked separately


class Body(BaseModel):
    # unknown fields are accepted and ignored, as the OpenAI API does (clients send vendor extensions)
    model_config = ConfigDict(extra="ignore")


# ---- requests ----
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
N = Annotated[int, Field(ge=1, le=MAX_N)]
Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Seed = Annotated[int, Field(ge=-(2 ** 63), lt=2 ** 63)]
TopK = Annotated[int, Field(ge=-1)]
MinP = Annotated[float, Field(ge=0, le=1)]
Repetition = Annotated[float, Field(ge=0.01, le=10)]  # (a positive logit / r: r near 0 would overflow it)


class StreamOptions(Body):
    include_usage: bool = False


class Sampling(Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: str
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Seed | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: keep generating past the end-of-text token, up to max_tokens
    # sampling controls OpenAI's API lacks, as extra body fields vLLM accepts under the same names
    top_k: TopK = 0  # keep the k most probable tokens (0 or -1 = off)
    min_p: MinP = 0.0  # drop tokens less probable than min_p x the most probable
    repetition_penalty: Repetition = 1.0  # seen tokens' logits: positive / r, negative x r (1 = off)

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class TextPart(Body):
    type: Literal["text"]
    text: str


class FunctionCall(Body):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: which call this answers
    reasoning_content: str | None = None  # earlier thinking: accepted and, as in DeepSeek's API, not fed back

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class Thinking(Body):
    type: Literal["enabled", "disabled"]


class ResponseFormat(Body):
    """OpenAI's response_format: plain text, or one JSON object (decoding constrained: dsv4.engine.json_mode)."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # DeepSeek's switch for the reasoning ("thinking") mode; also accepted as chat_template_kwargs={"thinking": true}
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # a release checkpoint's reasoning effort (also chat_template_kwargs={"reasoning_effort": ...}): see
    # dsv4.serve.prompts.EFFORTS; our own chat format has none and ignores it
    reasoning_effort: str | None = None
    response_format: ResponseFormat | None = None

    def wants_thinking(self) -> bool:
        if self.thinking is not None:
            return self.thinking.type == "enabled"
        return bool((self.chat_template_kwargs or {}).get("thinking", False))


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | \
        Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    max_tokens: Tokens = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False


# ---- responses ----
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens restored from the prefix cache (dsv4.engine.prefix), not prefilled


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: dict[str, str] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dsv4"
    max_model_len: int
    modalities: list[str] = ["text"]  # what it generates: + "image", "video" for a multimodal checkpoint


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
