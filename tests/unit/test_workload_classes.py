"""Which workload class a request runs in, and what the class does to it."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from common.engine.sampling import SamplingParams
from common.settings import GatewaySettings, WorkloadClass
from gateway.api_keys import ApiKey, new_key
from gateway.errors import APIError
from gateway.prepare import Prepared
from gateway.workload import WorkloadClasses

CLASSES = WorkloadClasses(
    {
        "chat": WorkloadClass(max_prompt_tokens=10, max_output_tokens=5, pool="chat"),
        "batch": WorkloadClass(priority="batch", pool="docs"),
    },
    "chat",
)


def _request(headers: dict[str, str] | None = None, key: ApiKey | None = None) -> Request:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    request = Request(scope)
    if key is not None:
        request.state.api_key = key
    return request


def _prep(prompt: int, max_tokens: int) -> Prepared:
    return Prepared(list(range(prompt)), SamplingParams.create(max_tokens=max_tokens), False, False)


def test_the_key_then_the_header_then_the_default():
    assert CLASSES.select(_request())[0] == "chat"
    assert CLASSES.select(_request({"x-kvrelay-class": "batch"}))[0] == "batch"
    bound = new_key("etl", workload_class="batch")[1]
    assert CLASSES.select(_request(key=bound))[0] == "batch"
    assert CLASSES.select(_request({"x-kvrelay-class": "batch"}, bound))[0] == "batch"
    with pytest.raises(APIError) as e:  # a key bound to batch cannot ask for chat's priority
        CLASSES.select(_request({"x-kvrelay-class": "chat"}, bound))
    assert e.value.status == 403
    with pytest.raises(APIError) as e:
        CLASSES.select(_request({"x-kvrelay-class": "gold"}))
    assert e.value.status == 400 and "known: ['batch', 'chat']" in e.value.message
    assert WorkloadClasses({}, None).select(_request({"x-kvrelay-class": "batch"})) is None  # no classes: alike


def test_caps_priority_and_pool():
    prep = _prep(8, 100)
    WorkloadClasses.apply(prep, "chat", CLASSES.classes["chat"], max_tokens_given=False)
    assert (prep.params.max_tokens, prep.pool, prep.priority, prep.workload_class) == (5, "chat", "interactive", "chat")
    with pytest.raises(APIError, match="allows at most 5"):
        WorkloadClasses.apply(_prep(8, 6), "chat", CLASSES.classes["chat"], max_tokens_given=True)
    with pytest.raises(APIError, match="at most 10 tokens; this one has 11"):
        WorkloadClasses.apply(_prep(11, 1), "chat", CLASSES.classes["chat"], max_tokens_given=True)
    batch = _prep(1000, 100)
    WorkloadClasses.apply(batch, "batch", CLASSES.classes["batch"], max_tokens_given=True)
    assert (batch.priority, batch.pool, batch.params.max_tokens) == ("batch", "docs", 100)


def test_a_default_class_must_exist():
    with pytest.raises(ValueError, match="default_workload_class 'vip'"):
        GatewaySettings(workload_classes={"chat": WorkloadClass()}, default_workload_class="vip")


def test_keys_signed_before_classes_existed_still_verify():
    rec = new_key("old")[1]
    rec.sign(b"s" * 32)
    assert rec.signed_by(b"s" * 32)
    rec.workload_class = "batch"  # a changed class is a changed record
    assert not rec.signed_by(b"s" * 32)
