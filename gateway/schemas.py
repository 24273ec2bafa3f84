"""The OpenAI request bodies we accept. Unknown fields are ignored, as OpenAI-compatible servers do;
fields we cannot honour with a non-default value are rejected by name (gateway.unsupported).
Numbers are bounded by what they mean and by what the wire to the workers carries."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_INT32_MAX = 2**31 - 1


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0, le=_INT32_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    ignore_eos: bool = False
    return_token_ids: bool = False  # extension: each choice also carries its output token ids
    user: str | None = None
    priority: Literal["interactive", "batch"] | None = None  # extension; also the X-Kvrelay-Priority header
    # ranges are SamplingParams' (common/engine/sampling.py), which names the field and the bounds
    presence_penalty: float | None = Field(None, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, allow_inf_nan=False)  # extension, as in vLLM
    logit_bias: dict[str, float] | None = None  # token id (a JSON key, so a string) -> bias
    # extension, as in vLLM: cached prefixes are shared only among requests with the same salt
    cache_salt: str | None = Field(None, min_length=1, max_length=256)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
