"""One typed settings object per role, filled from (highest first) command-line flags, KVRELAY_*
environment variables (nested with __, e.g. KVRELAY_ENGINE__THREADS=2) and a YAML file."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

from common.config import EngineConfig
from common.rpc.tls import TLSSettings
from common.tracing.settings import TracingSettings

log = logging.getLogger(__name__)
S = TypeVar("S", bound=BaseSettings)
_ENV_PREFIX = "KVRELAY_"
Transfer = Literal["grpc", "nixl"]


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVRELAY_", env_nested_delimiter="__", extra="forbid")

    role: Literal["prefill", "decode"] = "decode"
    host: str = "127.0.0.1"
    port: int | None = Field(
        None, ge=0, le=65535, description="default: 50051 for prefill, 50061 for decode; 0: a free one"
    )
    advertise_host: str | None = Field(None, description="address other services use to reach this worker")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="default: port + 1000 (a free one when port is 0)"
    )
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="also serve grpc.health.v1 alone on this plaintext port (for probes that cannot do mTLS); "
        "default: only on the main port",
    )
    worker_id: str | None = None
    transfer: Transfer = Field(
        "grpc",
        description="decode: how KV is pulled from prefill workers; prefill: 'nixl' also serves NIXL (a UCX agent "
        "exists only then), 'grpc' serves gRPC pulls only",
    )
    nixl_net_devices: str | None = Field(
        None,
        description="with transfer nixl: the network devices the UCX agent uses and listens on (UCX_NET_DEVICES, "
        "e.g. 'mlx5_0:1' or 'eth0'); default: only 'lo' when host is loopback, else every device",
    )
    shared_secret_file: str | None = Field(
        None,
        description="file holding the deployment's shared secret (a mounted secret): it signs KV handles and "
        "registry records; default: each prefill worker signs handles with a random key of its own and checks "
        "them itself, and records are unsigned",
    )
    prefill_peers: list[str] = Field(
        default_factory=list,
        description="decode: prefill worker addresses it may pull KV from (besides registered ones); with none "
        "and no registry or shared key, only loopback addresses",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    model_repo: str | None = Field(
        None, description="root of the model repository (`kvrelay models`); default: $XDG_DATA_HOME/kvrelay/models"
    )
    models: list[str] = Field(
        default_factory=list,
        description="serve several models (repository ids or paths), each with its own engine and KV cache of "
        "engine.kv_cache_mb; default: engine.model alone",
    )
    preload: list[str] | None = Field(
        None, description="models loaded at start (ids); default: every model, in order, while the budget allows"
    )
    memory_budget_mb: int | None = Field(
        None,
        gt=0,
        description="most memory the models may take together (weights and KV caches); a model not loaded is "
        "loaded on its first request, evicting the least recently used idle ones; default: no budget",
    )
    pool: str = Field(
        "",
        max_length=63,
        description="a label naming the worker pool it belongs to: a gateway workload class with this pool sends "
        "its requests only here (e.g. long-document batch work kept off the chat workers); default: none",
    )
    model_load_timeout_s: float = Field(
        60.0, gt=0, description="how long a request waits for the models in use to free the budget"
    )
    registry: str | None = Field(None, description="redis:// URL of the worker registry; unset: not registered")
    registry_prefix: str = Field("kvrelay", min_length=1, description="key prefix shared by one deployment")
    heartbeat_s: float = Field(1.0, gt=0, description="how often the registry record is renewed")
    registry_ttl_s: float = Field(5.0, gt=0, description="a record not renewed for this long expires")
    drain_notice_s: float = Field(
        2.5, ge=0, description="on SIGTERM: keep serving this long after deregistering, while gateways notice"
    )
    drain_timeout_s: float = Field(60.0, gt=0, description="on SIGTERM: most time to finish in-flight requests")
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings, description="mutual TLS for this worker's gRPC, both ways")

    @model_validator(mode="after")
    def _role_port(self) -> WorkerSettings:
        if self.port is None:
            self.port = 50051 if self.role == "prefill" else 50061
        if self.heartbeat_s >= self.registry_ttl_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s}) must be shorter than registry_ttl_s ({self.registry_ttl_s})"
            )
        return self

    def shared_secret(self) -> bytes | None:
        return read_secret(self.shared_secret_file)

    @property
    def address(self) -> str:
        """How other services reach this worker: advertise_host, else the listen address, else (when
        listening on every interface, as in a container) this host's own IP."""
        host = self.advertise_host or self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostbyname(socket.gethostname())
        return f"{host}:{self.port}"


class AuthSettings(BaseModel):
    """API keys (gateway/api_keys.py, gateway/access.py); managed with `kvrelay keys`."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="require an API key on /v1/ (off only when set so explicitly)")
    keys_file: str | None = Field(None, description="the keys file (default ~/.config/kvrelay/keys.json)")
    reload_s: float = Field(2.0, gt=0, description="how often gateways re-read the keys (revocations apply then)")
    cache_salt_per_key: bool = Field(True, description="isolate each key's prefix cache from every other key's")


class AdmissionSettings(BaseModel):
    """Back-pressure at the gateway: what may wait for a first token before new work gets a 429."""

    model_config = {"extra": "forbid"}

    max_waiting_per_worker: int = Field(
        16, gt=0, description="requests waiting for their first token, per worker of the prefilling pool"
    )
    max_queued_prompt_tokens_per_worker: int = Field(
        8192, gt=0, description="prompt tokens waiting to be prefilled, per worker of the prefilling pool"
    )
    batch_share: float = Field(
        0.5, gt=0, le=1, description="batch-priority requests are shed once the queue is this full"
    )
    max_streams_per_decode_worker: int = Field(
        64, ge=0, description="streams one decode worker is given at most (each slows its batch's steps); 0: no limit"
    )
    retry_after_s: float = Field(1.0, gt=0, description="Retry-After sent with a 429")


class WorkloadClass(BaseModel):
    """A kind of traffic with its own limits, priority and (optionally) its own workers, so that long
    document prompts never queue in front of chat turns."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_tokens: int | None = Field(None, gt=0, description="longer prompts get 400")
    max_output_tokens: int | None = Field(
        None, gt=0, description="a larger max_tokens gets 400; when a request sets none, this is its default"
    )
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="admission class; a request may lower it to batch, never raise it"
    )
    pool: str = Field("", max_length=63, description="only workers started with this --pool label; '': any")


class MigrationSettings(BaseModel):
    """How hard the gateway tries before a request fails: retries before the first token, migration
    of a running stream to another worker after it."""

    model_config = {"extra": "forbid"}

    max_attempts: int = Field(3, ge=1, description="attempts per request, the first included")
    deadline_s: float = Field(120.0, gt=0, description="no new attempt starts this long after arrival")
    stall_timeout_s: float = Field(30.0, gt=0, description="a worker that sends no token this long has stalled")


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KVRELAY_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str | None = Field(None, description="model path, for the tokenizer and chat template")
    served_model_name: str | None = Field(
        None, description="another name clients may use for the (first) model; default: its id only"
    )
    model_repo: str | None = Field(
        None, description="root of the model repository (`kvrelay models`); default: $XDG_DATA_HOME/kvrelay/models"
    )
    models: list[str] = Field(
        default_factory=list,
        description="serve several models (repository ids or paths): requests are routed by their `model` to the "
        "workers serving it; default: `model` alone",
    )
    prefill: list[str] = Field(default_factory=list, description="prefill worker addresses host:port")
    decode: list[str] = Field(default_factory=list, description="decode worker addresses host:port")
    routing_headers: bool = Field(
        False,
        description="answer with X-Kvrelay-Mode, -Decision, -Prefill and -Decode (worker ids, never addresses) and "
        "-Predicted-Cached-Tokens; off by default: they reveal the topology and what others' prompts cached",
    )
    max_model_len: int | None = Field(None, gt=0, description="context window; default: the model's, at most 8192")
    default_max_tokens: int = Field(512, gt=0, description="when a request sets none")
    max_tokens_limit: int = Field(4096, gt=0, description="largest max_tokens a request may ask for")
    request_timeout_s: float = Field(600.0, gt=0)
    prefill_timeout_s: float = Field(120.0, gt=0)
    health_interval_s: float = Field(1.0, gt=0)
    scheduler_config: str | None = Field(None, description="scheduler YAML (profiles, weights); default built in")
    registry: str | None = Field(None, description="redis:// URL: discover workers and share KV events there")
    registry_prefix: str = Field("kvrelay", min_length=1, description="key prefix shared by one deployment")
    auth: AuthSettings = Field(default_factory=AuthSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    migration: MigrationSettings = Field(default_factory=MigrationSettings)
    workload_classes: dict[str, WorkloadClass] = Field(
        default_factory=dict,
        description="named classes (e.g. chat, batch), chosen by the API key's class or the X-Kvrelay-Class "
        "header; none: every request is alike",
    )
    default_workload_class: str | None = Field(None, description="the class of requests that name none")
    routes_file: str | None = Field(
        None,
        description="model routes (canary, A/B, shadow) of a gateway without a registry, in JSON or YAML, re-read "
        "when it changes (`kvrelay route set --file`); with a registry they live in Redis, shared by every gateway",
    )
    routes_interval_s: float = Field(1.0, gt=0, description="how often routes are re-read and judged")
    max_body_bytes: int = Field(
        4 * 2**20,
        gt=0,
        description="request bodies above this get 413 unread (4 MiB: an 8k-token prompt is ~50 kB of text, "
        "or ~60 kB as token ids; the rest is room for long chat histories)",
    )
    header_timeout_s: float = Field(10.0, gt=0, description="a client must send its request headers within this")
    write_timeout_s: float = Field(30.0, gt=0, description="a client that reads nothing for this long is cut off")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="on SIGTERM: most time for running requests to end")
    drain_notice_s: float = Field(
        2.0, ge=0, description="on SIGTERM: answer /ready with 503 this long before refusing new requests"
    )
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    tls: TLSSettings = Field(default_factory=TLSSettings, description="mutual TLS to the workers")
    shared_secret_file: str | None = Field(
        None, description="the deployment's shared secret: registry records not signed with it are ignored"
    )
    internal_port: int | None = Field(
        None, ge=0, le=65535, description="serve /ready and /metrics only on this port (default: on the public one)"
    )
    internal_host: str = Field("127.0.0.1", description="where the internal port listens")
    https_cert_file: str | None = Field(None, description="serve the API over HTTPS with this PEM certificate")
    https_key_file: str | None = Field(None, description="the private key of https_cert_file")

    @model_validator(mode="after")
    def _default_class(self) -> GatewaySettings:
        if self.default_workload_class is not None and self.default_workload_class not in self.workload_classes:
            raise ValueError(
                f"default_workload_class {self.default_workload_class!r} is not one of the workload_classes "
                f"{sorted(self.workload_classes)}"
            )
        return self

    @model_validator(mode="after")
    def _https_pair(self) -> GatewaySettings:
        if (self.https_cert_file is None) != (self.https_key_file is None):
            raise ValueError("HTTPS needs both https_cert_file and https_key_file")
        return self


def read_secret(path: str | None) -> bytes | None:
    """A secret from its file (surrounding whitespace dropped); None when no file is configured."""
    if path is None:
        return None
    secret = Path(path).read_bytes().strip()
    if len(secret) < 16:
        raise ValueError(f"the secret in {path} is shorter than 16 bytes")
    return secret


def load_settings(cls: type[S], config_file: str | Path | None = None, **overrides: Any) -> S:
    """Build `cls` from flags (overrides; None means 'not given'), environment and YAML."""
    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"settings file {str(config_file)!r} does not exist")
    yaml_file = config_file

    class _Layered(cls):  # type: ignore[valid-type, misc]
        @classmethod
        def settings_customise_sources(
            cls_,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
            if yaml_file is not None:
                sources += (YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file),)
            return sources

    for name in unknown_env_vars(cls):
        log.warning("ignoring %s: %s has no such setting", name, cls.__name__)
    layered = _Layered(**_drop_none(overrides))
    return cls.model_validate(layered.model_dump())


def unknown_env_vars(cls: type[BaseModel], environ: Mapping[str, str] | None = None) -> list[str]:
    """KVRELAY_* variables that name no setting of `cls` (a typo would otherwise pass silently)."""
    unknown = []
    for name in os.environ if environ is None else environ:
        if not name.startswith(_ENV_PREFIX):
            continue
        model: type[BaseModel] | None = cls
        for part in name[len(_ENV_PREFIX) :].lower().split("__"):
            field = model.model_fields.get(part) if model is not None else None
            if field is None:
                unknown.append(name)
                break
            ann = field.annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return unknown


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out
