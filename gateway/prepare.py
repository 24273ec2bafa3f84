"""From a raw HTTP body to (prompt token ids, SamplingParams), or an APIError naming the field.
Everything a worker would reject is rejected here first, so bad input never reaches a worker."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from common.engine.sampling import SamplingParams
from common.errors import InvalidRequestError
from common.tokenizer import Tokenizer
from gateway.errors import APIError, bad_request
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.unsupported import reject_unsupported

M = TypeVar("M", bound=BaseModel)


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    return_token_ids: bool = False
    priority: str = "interactive"  # "interactive" | "batch"
    # The input as GenAI messages ({"role", "content"}), recorded in spans only when content capture is on.
    input_messages: list[dict] | None = None
    model: str = ""  # the served model id workers run it on
    model_name: str = ""  # the name the client asked for (a model's, or a route's)
    tokenizer: Tokenizer | None = None  # the model's, for the output text
    workload_class: str = ""  # "" when the gateway has no classes
    pool: str = ""  # the worker pool its class is kept to ("": any)


async def parse_body(request: Request, model: type[M]) -> M:
    ctype = request.headers.get("content-type", "")
    if "application/json" not in ctype:
        raise APIError(
            415, f"Content-Type must be application/json, got {ctype or 'nothing'!r}", code="unsupported_media_type"
        )
    raw = await request.body()
    try:
        data = await asyncio.to_thread(json.loads, raw)  # a large body must not stall the event loop
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}", code="invalid_json") from e
    except ValueError as e:  # Python refuses integer literals of over 4,300 digits
        raise bad_request(
            "the body holds a number with thousands of digits; no field takes one", code="invalid_json"
        ) from e
    except RecursionError as e:
        raise bad_request("the body is nested too deeply", code="invalid_json") from e
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", code="invalid_json")
    _check_strings(data)
    reject_unsupported(data)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _field_path(err["loc"])
        raise bad_request(f"{param}: {err['msg']}" if param else err["msg"], param) from e


class Preparer:
    """One served model's: its tokenizer and context window decide what a request may be."""

    def __init__(self, tokenizer: Tokenizer, model_id: str, max_model_len: int, settings) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.settings = settings

    def chat(self, body: ChatCompletionRequest) -> Prepared:
        try:
            ids = self.tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        except InvalidRequestError as e:
            raise bad_request(str(e), "messages") from e
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        prep = self._finish(body, ids, max_tokens, "messages", param)
        prep.input_messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return prep

    def completion(self, body: CompletionRequest) -> Prepared:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise bad_request("only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= t < self.tokenizer.vocab_size for t in ids):
                raise bad_request(f"prompt token ids must be in [0, {self.tokenizer.vocab_size})", "prompt")
        prep = self._finish(body, ids, body.max_tokens, "prompt", "max_tokens")
        if isinstance(prompt, str):
            prep.input_messages = [{"role": "user", "content": prompt}]
        return prep

    def _finish(self, body, ids: list[int], max_tokens: int | None, prompt_param: str, mt_param: str) -> Prepared:  # noqa: ANN001
        if not ids:
            raise bad_request("the prompt is empty", prompt_param)
        room = self.max_model_len - len(ids)
        if room < 1:
            raise bad_request(
                f"this model's context window is {self.max_model_len} tokens and the prompt has {len(ids)}; shorten it",
                prompt_param,
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(room, self.settings.default_max_tokens)
        elif max_tokens < 1:
            raise bad_request(f"{mt_param} must be at least 1, got {max_tokens}", mt_param)
        elif max_tokens > self.settings.max_tokens_limit:
            raise bad_request(
                f"{mt_param} is {max_tokens}; this server allows at most {self.settings.max_tokens_limit}", mt_param
            )
        elif max_tokens > room:
            raise bad_request(
                f"{mt_param} is {max_tokens} but only {room} tokens are left in the {self.max_model_len}-token "
                f"context after the {len(ids)}-token prompt",
                mt_param,
                "context_length_exceeded",
            )
        try:
            params = SamplingParams.create(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=body.top_k or 0,
                seed=body.seed,
                stop=body.stop,
                ignore_eos=body.ignore_eos,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
                logit_bias=body.logit_bias,
                cache_salt=body.cache_salt or "",
            )
        except InvalidRequestError as e:
            raise bad_request(str(e), e.param) from e
        vocab = self.tokenizer.vocab_size
        if params.logit_bias and (top := max(t for t, _ in params.logit_bias)) >= vocab:
            raise bad_request(f"logit_bias token id {top} is outside the model's vocabulary [0, {vocab})", "logit_bias")
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Prepared(
            ids,
            params,
            body.stream,
            include_usage,
            body.return_token_ids,
            model=self.model_id,
            model_name=body.model,
            tokenizer=self.tokenizer,
        )


def _check_strings(data: dict) -> None:
    """No string may hold a NUL or a lone surrogate (JSON allows both escaped; neither is text a
    tokenizer can take). Iterative: the body may be nested deeply."""
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            _check_text(value, path or "a string", path or None)
        elif isinstance(value, dict):
            for k in value:  # keys first: a bad key must not end up in the error's own param
                _check_text(k, f"a key in {path or 'the body'}", path or None)
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", v) for i, v in enumerate(value))


def _check_text(value: str, where: str, param: str | None) -> None:
    if "\x00" in value:
        raise bad_request(f"{where} contains a NUL character; remove it", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{where} is not valid Unicode text ({e.reason}); send UTF-8 text", param) from e


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list"}


def _field_path(loc: tuple) -> str | None:
    """The field a validation error is about, without the union-member tags pydantic appends
    (`stop.str`, `prompt.list[int]`)."""
    parts: list[str] = []
    for p in loc:
        if isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or p[:1].isupper()):
            break
        parts.append(str(p))
    return ".".join(parts) or None
