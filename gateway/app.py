"""The FastAPI application: OpenAI routes, health and readiness, metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.discovery.record import RegistryKeys
from common.discovery.redis_client import check_redis, open_redis
from common.repository.store import use_repository
from common.rpc.channels import ChannelPool
from common.settings import GatewaySettings, read_secret
from common.tracing.setup import init_tracing, kvrelay_version, shutdown_tracing
from gateway.access import AuthMiddleware, Authorizer
from gateway.accounting import RequestAccounting
from gateway.admission import PRIORITIES, Admission
from gateway.api_keys import KeyStore
from gateway.body_limit import BodyLimitMiddleware
from gateway.cancellation import cancel_and_wait
from gateway.catalog import ModelCatalog, ServedModel
from gateway.client_gone import ClientGoneError
from gateway.discovery import RedisDiscovery, StaticDiscovery
from gateway.errors import APIError, api_error_handler, http_error_handler, unexpected_error_handler
from gateway.http_limits import WriteTimeoutMiddleware
from gateway.kv_event_stream import RedisKVEventWatcher
from gateway.kv_events import KVEventWatcher
from gateway.lifecycle import Lifecycle
from gateway.metrics import INFO
from gateway.observer import RequestObserver
from gateway.ops import add_ops_routes, health
from gateway.orchestrator import Orchestrator
from gateway.prepare import Prepared, parse_body
from gateway.rate_limits import MemoryBuckets, RedisBuckets
from gateway.registry import WorkerRegistry
from gateway.request_record import OK, SERVER_SIDE
from gateway.responses import Responder, Shape
from gateway.routes.router import Assignment, Router
from gateway.routes.shadow import ShadowTraffic
from gateway.routes.store import MemoryRouteStore, RedisRouteStore, RouteStore
from gateway.scheduling.config import load_config
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.scheduler import Scheduler
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.supervisor import Supervisor
from gateway.workload import WorkloadClasses

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings) -> FastAPI:
    use_repository(settings.model_repo)
    catalog = ModelCatalog(settings)
    model_name = catalog.names()[0]
    init_tracing("kvrelay-gateway", settings.tracing, attributes={"kvrelay.model": model_name}, edge=True)
    INFO.labels(model_name, kvrelay_version()).set(1)
    channels = ChannelPool(settings.tls)
    index = PrefixIndex()
    if settings.registry:
        client = open_redis(settings.registry)
        discovery: StaticDiscovery = RedisDiscovery(
            client,
            RegistryKeys(settings.registry_prefix),
            settings.prefill,
            settings.decode,
            read_secret(settings.shared_secret_file),
        )
        watcher: KVEventWatcher = RedisKVEventWatcher(channels, index, client)
    else:
        discovery = StaticDiscovery(settings.prefill, settings.decode)
        watcher = KVEventWatcher(channels, index)
    registry = WorkerRegistry(channels, discovery, settings.health_interval_s, catalog.default.model_id, watcher)
    scheduler = Scheduler(load_config(settings.scheduler_config), index)
    orchestrator = Orchestrator(registry, channels, settings, scheduler)
    supervisor = Supervisor(orchestrator, registry, settings.migration)
    admission = Admission(settings.admission, registry)
    responder = Responder(supervisor, admission, settings.routing_headers)
    router = Router(_route_store(settings))
    shadows = ShadowTraffic(supervisor, catalog, router)
    classes = WorkloadClasses(settings.workload_classes, settings.default_workload_class)
    lifecycle = Lifecycle(settings.drain_notice_s, settings.shutdown_timeout_s)
    keys = KeyStore(
        settings.auth.keys_file, settings.registry, settings.registry_prefix, read_secret(settings.shared_secret_file)
    )
    buckets = RedisBuckets(client, settings.registry_prefix) if settings.registry else MemoryBuckets()
    authorizer = Authorizer(buckets, settings.auth.cache_salt_per_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if settings.registry:
            await check_redis(client, settings.registry)
        reloading = None
        if settings.auth.enabled:
            await asyncio.to_thread(keys.load)
            if not len(keys):
                log.warning(
                    "API keys are on and none exist: every request gets 401; create one with `kvrelay keys add`"
                )
            reloading = asyncio.get_running_loop().create_task(_reload_keys(keys, settings.auth.reload_s))
        else:
            log.warning(
                "API keys are off: anyone who can reach %s:%d may use this gateway", settings.host, settings.port
            )
        await registry.start()
        await router.tick()  # the routes exist before the first request
        judging = asyncio.get_running_loop().create_task(router.run(settings.routes_interval_s))
        yield
        await cancel_and_wait([judging], 5.0)
        await shadows.stop()
        if reloading is not None:
            await cancel_and_wait([reloading], 5.0)
        await registry.stop()
        await channels.close()
        shutdown_tracing()

    # FastAPI's own telemetry is off: kvrelay's middleware traces only the API routes, adds X-Trace-Id,
    # and never records request bodies or validation messages (they can hold prompt text).
    app = FastAPI(
        title="kvrelay gateway",
        lifespan=lifespan,
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.state.registry = registry
    app.state.settings = settings
    app.state.lifecycle = lifecycle

    app.add_middleware(RequestAccounting, lifecycle=lifecycle)
    app.add_middleware(WriteTimeoutMiddleware, write_timeout_s=settings.write_timeout_s)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.auth.enabled:
        app.add_middleware(AuthMiddleware, keys=keys, buckets=buckets)  # before the body is read
    app.add_middleware(RequestObserver)  # added last: outermost, so its span covers everything

    async def generate(
        request: Request, shape: Shape, request_id: str, prep: Prepared, priority: str | None, max_tokens_given: bool
    ) -> Response:
        prep.priority = _priority(request, priority)
        selected = classes.select(request)
        if selected is not None:
            classes.apply(prep, *selected, max_tokens_given)
        salt = authorizer.cache_salt(request, prep.params.cache_salt)
        if salt != prep.params.cache_salt:
            prep.params = dataclasses.replace(prep.params, cache_salt=salt)
        await authorizer.reserve(request, len(prep.prompt_ids) + prep.params.max_tokens, request.state.record.on_end)
        try:
            return await responder.respond(shape, request_id, prep, request)
        except ClientGoneError:
            request.state.record.cancel()
            return Response(status_code=499)  # nobody reads it: the client has gone

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        lifecycle.check_accepting()
        body = await parse_body(request, ChatCompletionRequest)
        authorizer.check_model(request, body.model)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        served = _target(request, body.model, body.user, request_id)
        # Tokenizing and templating run off the event loop: a huge prompt must not stall other requests.
        prep = await asyncio.to_thread(served.preparer.chat, body)
        given = body.max_tokens is not None or body.max_completion_tokens is not None
        response = await generate(request, Shape("chat"), request_id, prep, body.priority, given)
        _shadow(request, body, prep, response)
        return response

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        lifecycle.check_accepting()
        body = await parse_body(request, CompletionRequest)
        authorizer.check_model(request, body.model)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        served = _target(request, body.model, body.user, request_id)
        prep = await asyncio.to_thread(served.preparer.completion, body)
        response = await generate(request, Shape("text"), request_id, prep, body.priority, body.max_tokens is not None)
        _shadow(request, body, prep, response)
        return response

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        key = Authorizer.key_of(request)
        listed = []
        for name in router.public_names():
            if key is None or key.allows(name):
                served = [catalog.get(v.model) for v in router.get(name).variants]
                lens = [m.max_model_len for m in served if m is not None]
                listed.append({"id": name, "max_model_len": min(lens) if lens else 0})
        for name in catalog.names():
            if key is None or key.allows(name):  # a key sees only its models
                listed.append({"id": name, "max_model_len": catalog.get(name).max_model_len})
        created = int(time.time())
        return {
            "object": "list",
            "data": [{**m, "object": "model", "created": created, "owned_by": "kvrelay"} for m in listed],
        }

    def _target(request: Request, name: str, user: str | None, request_id: str) -> ServedModel:
        """The served model a request for `name` runs on: a route's variant (sticky per API key, else
        per `user`), or the model of that name."""
        key = Authorizer.key_of(request)
        # Sticky per end user: a shared service key with `user` set spreads its users over the variants.
        who = ":".join(part for part in (key.id if key is not None else None, user) if part) or None
        assignment = router.resolve(name, who, request_id)
        if assignment is not None:
            request.state.assignment = assignment
            served = catalog.get(assignment.model)
            if served is None:
                router.record(assignment, False)  # the variant fails its share: the judge must see it
                raise APIError(
                    503,
                    f"route {name!r} sends this request to model {assignment.model!r}, which this gateway does not "
                    f"serve; fix the route (`kvrelay route set`)",
                    "server_error",
                    code="route_misconfigured",
                )
            request.state.record.on_end(lambda _: _judge(request, assignment))
            return served
        served = catalog.get(name)
        if served is None:
            raise catalog.not_found(name, router.public_names())
        return served

    def _judge(request: Request, assignment: Assignment) -> None:
        """Feed the route's judge what this request came to: failures on our side count against the
        variant; the client's errors, cancellations and load shedding say nothing about it."""
        record = request.state.record
        if record.outcome == OK:
            router.record(assignment, True, record.ttft_s, record.tpot_s)
        elif record.outcome in SERVER_SIDE:
            router.record(assignment, False, record.ttft_s, record.tpot_s)

    def _shadow(
        request: Request, body: ChatCompletionRequest | CompletionRequest, prep: Prepared, response: Response
    ) -> None:
        """Mirror an admitted request (never one turned away: that would add load where there is too
        much), held to what the original was: its tenant's cache salt, its class's output cap and pool."""
        assignment = getattr(request.state, "assignment", None)
        if assignment is not None and assignment.shadow_model is not None and response.status_code == 200:
            shadows.mirror(assignment, body, prep.params.cache_salt, prep.params.max_tokens, prep.pool)

    ops = FastAPI(title="kvrelay gateway (internal)") if settings.internal_port is not None else app
    add_ops_routes(ops, registry, lifecycle)
    if ops is not app:
        app.get("/health")(health)  # load balancers' liveness stays on the public port
        app.state.internal_app = ops

    return app


def _route_store(settings: GatewaySettings) -> RouteStore:
    if settings.registry:
        return RedisRouteStore.from_url(
            settings.registry, settings.registry_prefix, read_secret(settings.shared_secret_file)
        )
    if settings.routes_file:
        return MemoryRouteStore.from_file(settings.routes_file)
    return MemoryRouteStore()


async def _reload_keys(keys: KeyStore, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        await asyncio.to_thread(keys.reload)


def _priority(request: Request, field: str | None) -> str:
    """The request's priority class: the X-Kvrelay-Priority header, else the body's `priority`."""
    value = request.headers.get("x-kvrelay-priority") or field or "interactive"
    if value not in PRIORITIES:
        raise APIError(400, f"priority must be one of {list(PRIORITIES)}, got {value!r}", param="priority")
    return value
