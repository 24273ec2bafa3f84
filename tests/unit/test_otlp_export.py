"""With an OTLP endpoint configured, spans leave the process over OTLP (gRPC or HTTP) instead of
going to files: a receiver in the test decodes what arrives."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, HTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from kvrelay.launcher import free_port

EMIT = """
import sys
from common.tracing.settings import TracingSettings
from common.tracing.setup import init_tracing, shutdown_tracing, tracer
init_tracing("kvrelay-test", TracingSettings(otlp_endpoint=sys.argv[1], otlp_protocol=sys.argv[2], dir=sys.argv[3]))
with tracer("t").start_as_current_span("otlp-probe") as span:
    span.set_attribute("kvrelay.probe", 7)
shutdown_tracing()
"""


def names_in(request: trace_service_pb2.ExportTraceServiceRequest) -> list[tuple[str, str]]:
    out = []
    for rs in request.resource_spans:
        service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
        out += [(service, s.name) for ss in rs.scope_spans for s in ss.spans]
    return out


def emit(endpoint: str, protocol: str, trace_dir: str) -> None:
    subprocess.run([sys.executable, "-c", EMIT, endpoint, protocol, trace_dir], check=True, timeout=60)


def test_otlp_over_http(tmp_path):
    received: list[tuple[str, bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()
            self.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", free_port()), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        emit(f"http://127.0.0.1:{server.server_port}", "http", str(tmp_path))
    finally:
        server.shutdown()
    assert [p for p, _ in received] == ["/v1/traces"]
    req = trace_service_pb2.ExportTraceServiceRequest.FromString(received[0][1])
    assert names_in(req) == [("kvrelay-test", "otlp-probe")]
    assert not list(tmp_path.iterdir()), "with OTLP configured, no span files are written"


@pytest.mark.timeout(120)
def test_otlp_over_grpc(tmp_path):
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):  # noqa: N802, ANN001, ANN201
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        emit(f"http://127.0.0.1:{port}", "grpc", str(tmp_path))
    finally:
        server.stop(None)
    assert [n for r in received for n in names_in(r)] == [("kvrelay-test", "otlp-probe")]
