"""Tracing settings, shared by every role (KVRELAY_TRACING__* in the environment)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def default_trace_dir() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "kvrelay", "traces")


class TracingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    sample_ratio: float = Field(1.0, ge=0.0, le=1.0, description="root sampling ratio; children follow the parent")
    dir: str = Field(default_factory=default_trace_dir, description="JSON-lines span files, one per process")
    otlp_endpoint: str | None = Field(
        None, description="export over OTLP instead of to files (default: $OTEL_EXPORTER_OTLP_ENDPOINT if set)"
    )
    otlp_protocol: Literal["grpc", "http"] = "grpc"
    capture_content: bool = Field(False, description="record prompt and completion text in spans (off: privacy)")
    trust_client_sampling: bool = Field(
        False, description="obey the sampled flag of a client's traceparent (off: the gateway decides by ratio)"
    )
    keep_errors_and_slow: bool = Field(
        True, description="below ratio 1, still export the gateway's spans of failed and slow requests"
    )
    slow_request_s: float = Field(10.0, gt=0, description="a request this long counts as slow for keep_errors_and_slow")
