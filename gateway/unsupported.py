"""OpenAI request parameters kvrelay does not implement. Each is rejected with a 400 naming it,
unless its value is the API's no-op default: clients send `n: 1`, `logprobs: false` or
`tool_choice: "none"` routinely, and those must keep working. (Penalties and logit_bias are
implemented: see common/engine/penalties.py.)"""

from __future__ import annotations

from collections.abc import Callable

from gateway.errors import bad_request


def _absent_or(*noops: object) -> Callable[[object], bool]:
    return lambda v: v is None or v in noops


def _text_format(v: object) -> bool:
    return v is None or (isinstance(v, dict) and v.get("type") == "text")


def _no_tools(v: object) -> bool:
    return v is None or v == "none"


# parameter -> (is its value a no-op?, what a user should know)
_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "logprobs": (_absent_or(False, 0), "logprobs are not supported by this server"),
    "top_logprobs": (_absent_or(0), "logprobs are not supported by this server"),
    "n": (_absent_or(1), "only n=1 is supported"),
    "best_of": (_absent_or(1), "only best_of=1 is supported"),
    "tools": (lambda v: not v, "tools are not supported by this server"),
    "tool_choice": (_no_tools, "tools are not supported by this server"),
    "functions": (lambda v: not v, "functions are not supported by this server"),
    "function_call": (_no_tools, "functions are not supported by this server"),
    "parallel_tool_calls": (_absent_or(True), "tools are not supported by this server"),
    "response_format": (_text_format, "only response_format {'type': 'text'} is supported"),
    "audio": (lambda v: v is None, "audio output is not supported by this server"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported by this server"),
    "echo": (_absent_or(False), "echo is not supported by this server"),
    "suffix": (lambda v: v is None or v == "", "suffix is not supported by this server"),
}


def reject_unsupported(body: dict) -> None:
    """Raise a 400 for the first parameter set to something kvrelay would silently ignore."""
    for name, (noop, why) in _RULES.items():
        if name in body and not noop(body[name]):
            raise bad_request(f"{name}={body[name]!r}: {why}", name, "unsupported_parameter")
