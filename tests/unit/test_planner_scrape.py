"""Scraping the gateways: URLs, bearer tokens, HTTPS with a private CA, gateways that fail."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx

from gateway.planner.scrape import Scraper, metrics_url
from tests.unit.test_planner_signals import FakeGateway


def test_metrics_url_accepts_a_base_url_or_the_full_one():
    assert metrics_url("http://gw:8000") == "http://gw:8000/metrics"
    assert metrics_url("gw:9100/") == "http://gw:9100/metrics"
    assert metrics_url("https://gw/internal/metrics") == "https://gw/internal/metrics"


def test_each_scrape_sends_the_token_read_from_its_file_now(tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    seen = []
    gw = FakeGateway().pool("decode", 1, 0, 0, 0)

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, text=gw.text())

    scraper = Scraper(["http://gw:8000"], token_file=str(token), transport=httpx.MockTransport(answer))
    scraper.scrape()
    token.write_text("rotated")
    scraper.scrape()
    assert seen == ["Bearer first", "Bearer rotated"]


def test_signals_window_each_gateway_and_skip_one_that_fails(caplog):
    good = FakeGateway().pool("prefill", 2, 1, 0, 0.1).pool("decode", 2, 8, 0, 0.3)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "down":
            return httpx.Response(503, text="draining")
        return httpx.Response(200, text=good.text())

    scraper = Scraper(["http://up:8000", "http://down:8000"], transport=httpx.MockTransport(answer))
    first = scraper.signals()
    assert first is not None and first.requests == 0 and first.ttft_p95 is None
    good.serve(0.4, 0.03, n=20)
    second = scraper.signals()
    assert second.requests == 20 and 0.25 < second.ttft_p95 <= 0.5
    assert second.pools["decode"].workers_up == 2
    assert "could not scrape http://down:8000/metrics" in caplog.text


def test_no_gateway_answering_is_no_signal_not_no_traffic():
    scraper = Scraper(["http://gw:8000"], transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    assert scraper.signals() is None and scraper.snapshot() is None


def test_https_with_a_private_ca(tmp_path):
    gw = FakeGateway().pool("decode", 4, 0, 0, 0)
    with _https_server(tmp_path, gw.text()) as url:
        assert Scraper([url], ca_file=str(tmp_path / "ca.pem")).snapshot().pools["decode"].workers_up == 4
        assert Scraper([url]).scrape() == {}  # the system CAs do not know this one


def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A throwaway CA certificate that also serves 127.0.0.1, and its key (ca.pem, key.pem)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "ca.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


def serve_metrics(text: str, context: ssl.SSLContext | None = None) -> tuple[http.server.HTTPServer, str]:
    """An HTTP(S) server on a free loopback port that answers every GET with `text`."""
    handler = type("Handler", (_Metrics,), {"body": text.encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    scheme = "https" if context is not None else "http"
    return server, f"{scheme}://127.0.0.1:{server.server_address[1]}"


@contextlib.contextmanager
def _https_server(tmp_path: Path, text: str) -> Iterator[str]:
    cert, key = self_signed_cert(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server, url = serve_metrics(text, context)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
