"""Shadow traffic: a copy of a routed request sent to the route's shadow model, run to its end with
the output thrown away; only whether it succeeded is recorded. The copy never touches the client's
path: it runs detached, a bounded number at a time (past that, copies are dropped and counted), and
is neither admitted nor charged to the caller's limits."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid

from gateway.catalog import ModelCatalog
from gateway.routes.metrics import SHADOW_REQUESTS
from gateway.routes.router import Assignment, Router
from gateway.scheduling.types import Placement
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.supervisor import Outcome, Supervisor

log = logging.getLogger(__name__)


class ShadowTraffic:
    def __init__(self, supervisor: Supervisor, catalog: ModelCatalog, router: Router, max_inflight: int = 8) -> None:
        self.supervisor = supervisor
        self.catalog = catalog
        self.router = router
        self.max_inflight = max_inflight
        self._tasks: set[asyncio.Task] = set()

    def mirror(
        self,
        assignment: Assignment,
        body: ChatCompletionRequest | CompletionRequest,
        cache_salt: str,
        max_tokens: int,
        pool: str = "",
    ) -> None:
        if len(self._tasks) >= self.max_inflight:
            SHADOW_REQUESTS.labels(assignment.route, "dropped").inc()
            return
        task = asyncio.get_running_loop().create_task(self._run(assignment, body, cache_salt, max_tokens, pool))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(
        self,
        assignment: Assignment,
        body: ChatCompletionRequest | CompletionRequest,
        cache_salt: str,
        max_tokens: int,
        pool: str,
    ) -> None:
        assert assignment.shadow_model is not None
        served = self.catalog.get(assignment.shadow_model)
        ok = False
        try:
            if served is None:
                raise LookupError(f"shadow model {assignment.shadow_model!r} is not served by this gateway")
            prepare = served.preparer.chat if isinstance(body, ChatCompletionRequest) else served.preparer.completion
            prep = await asyncio.to_thread(prepare, body)
            cap = min(prep.params.max_tokens, max_tokens)  # never longer than the answer the client got
            params = dataclasses.replace(prep.params, cache_salt=cache_salt, max_tokens=cap)
            deltas = self.supervisor.serve(
                f"shadow-{uuid.uuid4().hex}", prep.prompt_ids, params, Outcome(), Placement(served.model_id, pool)
            )
            async for _ in deltas:
                pass
            ok = True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # whatever failed the copy, the client's request is not concerned
            log.info("a shadow request of route %s to %s failed: %s", assignment.route, assignment.shadow_model, e)
        self.router.record_shadow(assignment, ok)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
