"""Workload classes: which class a request runs in, and what that class allows it.

A request's class is its API key's (a key bound to a class cannot leave it), else the
X-Kvrelay-Class header, else the gateway's default. The class caps the prompt and the output,
sets the admission priority (a request may lower its own, never raise it above its class's) and
may keep the request to one pool of workers (a label they were started with).
"""

from __future__ import annotations

import dataclasses

from fastapi import Request

from common.settings import WorkloadClass
from gateway.access import Authorizer
from gateway.errors import APIError, bad_request
from gateway.prepare import Prepared

HEADER = "x-kvrelay-class"


class WorkloadClasses:
    def __init__(self, classes: dict[str, WorkloadClass], default: str | None) -> None:
        self.classes = classes
        self.default = default

    def select(self, request: Request) -> tuple[str, WorkloadClass] | None:
        """The request's class, or None when the gateway has none (every request alike)."""
        if not self.classes:
            return None
        key = Authorizer.key_of(request)
        bound = key.workload_class if key is not None else None
        asked = request.headers.get(HEADER)
        if bound and asked and asked != bound:
            raise APIError(
                403,
                f"this API key runs in workload class {bound!r}; it cannot ask for {asked!r}",
                "permission_error",
                code="workload_class_not_allowed",
            )
        name = bound or asked or self.default
        if name is None:
            return None
        if name not in self.classes:
            raise bad_request(
                f"unknown workload class {name!r} (from the {HEADER} header or the API key); "
                f"known: {sorted(self.classes)}",
                "X-Kvrelay-Class",
                "unknown_workload_class",
            )
        return name, self.classes[name]

    @staticmethod
    def apply(prep: Prepared, name: str, cls: WorkloadClass, max_tokens_given: bool) -> None:
        """Hold `prep` to its class: 400 past the caps, the class's priority and pool."""
        prompt = len(prep.prompt_ids)
        if cls.max_prompt_tokens is not None and prompt > cls.max_prompt_tokens:
            raise bad_request(
                f"workload class {name!r} takes prompts of at most {cls.max_prompt_tokens} tokens; this one has "
                f"{prompt}",
                "messages",
                "context_length_exceeded",
            )
        limit = cls.max_output_tokens
        if limit is not None and prep.params.max_tokens > limit:
            if max_tokens_given:
                raise bad_request(
                    f"max_tokens is {prep.params.max_tokens}; workload class {name!r} allows at most {limit}",
                    "max_tokens",
                )
            prep.params = dataclasses.replace(prep.params, max_tokens=limit)
        if cls.priority == "batch":
            prep.priority = "batch"
        prep.workload_class = name
        prep.pool = cls.pool
