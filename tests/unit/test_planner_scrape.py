"""Scraping the gateways: URLs, bearer tokens, HTTPS with a private CA, gateways that fail, and a
name with several addresses (a headless Service) scraped once per address."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.planner.scrape import Scraper, metrics_url, per_address
from tests.unit.test_planner_signals import FakeGateway


class StubDNS:
    """A getaddrinfo stand-in: name -> addresses (IPv6 ones hold a colon), changeable between
    scrapes; an unknown name fails as getaddrinfo does. Records every call."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = dict(table or {})
        self.calls: list[tuple[str, int, dict[str, Any]]] = []

    def __call__(self, host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls.append((host, port, kwargs))
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for address in self.table[host]:
            if ":" in address:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return out


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

    scraper = Scraper(
        ["http://gw:8000"], token_file=str(token), transport=httpx.MockTransport(answer), resolve=StubDNS()
    )
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

    dns = StubDNS({"up": ["10.0.0.1"], "down": ["10.0.0.2"]})
    scraper = Scraper(["http://up:8000", "http://down:8000"], transport=httpx.MockTransport(answer), resolve=dns)
    first = scraper.signals()
    assert first is not None and first.requests == 0 and first.ttft_p95 is None
    good.serve(0.4, 0.03, n=20)
    second = scraper.signals()
    assert second.requests == 20 and 0.25 < second.ttft_p95 <= 0.5
    assert second.pools["decode"].workers_up == 2
    assert "could not scrape http://down:8000/metrics" in caplog.text


def test_no_gateway_answering_is_no_signal_not_no_traffic():
    scraper = Scraper(
        ["http://gw:8000"], transport=httpx.MockTransport(lambda r: httpx.Response(500)), resolve=StubDNS()
    )
    assert scraper.signals() is None and scraper.snapshot() is None


def test_https_with_a_private_ca(tmp_path):
    gw = FakeGateway().pool("decode", 4, 0, 0, 0)
    with _https_server(tmp_path, gw.text()) as url:
        assert Scraper([url], ca_file=str(tmp_path / "ca.pem")).snapshot().pools["decode"].workers_up == 4
        assert Scraper([url]).scrape() == {}  # the system CAs do not know this one


def test_the_stub_dns_answers_like_getaddrinfo():
    infos = StubDNS({"gw": ["10.0.0.1"]})("gw", 8001, type=socket.SOCK_STREAM)
    real = socket.getaddrinfo("127.0.0.1", 8001, type=socket.SOCK_STREAM)
    assert [(i[0], i[1], len(i[4])) for i in infos] == [(f, t, len(a)) for f, t, _, _, a in real[:1]]


def test_a_name_with_several_addresses_becomes_one_url_each():
    dns = StubDNS({"gateway-internal.kvrelay.svc": ["10.1.0.7", "10.1.0.9", "10.1.0.7"]})
    urls = per_address("http://gateway-internal.kvrelay.svc:8001/metrics?x=1", dns)
    assert urls == ["http://10.1.0.7:8001/metrics?x=1", "http://10.1.0.9:8001/metrics?x=1"]
    assert dns.calls == [("gateway-internal.kvrelay.svc", 8001, {"type": socket.SOCK_STREAM})]
    dns.table["gw"] = ["fd00::1", "fd00::2"]
    assert per_address("http://gw/metrics", dns) == ["http://[fd00::1]/metrics", "http://[fd00::2]/metrics"]
    assert dns.calls[-1][1] == 80, "no port in the URL: the scheme's"
    dns.table["auth"] = ["10.0.0.1", "10.0.0.2"]
    assert per_address("http://u:p@auth:9/m", dns) == ["http://u:p@10.0.0.1:9/m", "http://u:p@10.0.0.2:9/m"]


def test_a_dual_stack_name_is_expanded_in_one_family():
    """A dual-stack headless Service has an A and an AAAA record per pod: one scrape per pod, not two."""
    dns = StubDNS({"gw": ["fd00::1", "10.0.0.1", "fd00::2", "10.0.0.2"]})
    assert per_address("http://gw:8001/metrics", dns) == [
        "http://[fd00::1]:8001/metrics",
        "http://[fd00::2]:8001/metrics",
    ]


@pytest.mark.parametrize(
    ("url", "looked_up"),
    [
        ("https://gw:8001/metrics", None),  # the certificate names gw, not its addresses
        ("http://10.0.0.1:8001/metrics", None),
        ("http://[fd00::1]:8001/metrics", None),
        ("http://one:8001/metrics", "one"),
        ("http://unknown:8001/metrics", "unknown"),
        ("http://empty:8001/metrics", "empty"),
    ],
)
def test_a_url_is_kept_when_it_names_one_place_or_is_https(url, looked_up, caplog):
    dns = StubDNS({"gw": ["10.0.0.1", "10.0.0.2"], "one": ["10.0.0.3"], "empty": []})
    assert per_address(url, dns) == [url]
    assert [c[0] for c in dns.calls] == ([looked_up] if looked_up else [])
    if looked_up == "unknown":
        assert "could not resolve unknown" in caplog.text


def test_each_gateway_pod_is_scraped_and_windowed_on_its_own():
    """Behind one headless name: each pod's histogram is windowed against that pod's previous
    scrape, the name is resolved again at every scrape, a new pod counts from its second scrape,
    and a pod no longer listed is forgotten."""
    pods = {ip: FakeGateway().pool("decode", 2, 8, 0, 0.3) for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3")}
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, text=pods[request.url.host].text())

    dns = StubDNS({"gateway-internal": ["10.0.0.1", "10.0.0.2"]})
    scraper = Scraper(["http://gateway-internal:8001"], transport=httpx.MockTransport(answer), resolve=dns)
    first = scraper.signals()
    assert first is not None and first.requests == 0, "no pod has an earlier scrape yet"
    assert seen == ["http://10.0.0.1:8001/metrics", "http://10.0.0.2:8001/metrics"]
    pods["10.0.0.1"].serve(0.2, 0.02, n=10)
    pods["10.0.0.2"].serve(3.0, 0.02, n=10)
    second = scraper.signals()
    assert second.requests == 20 and second.ttft_p95 > 2.5, "both pods' windows, the slow one included"

    pods["10.0.0.3"].serve(0.1, 0.01, n=100)  # a replacement pod, with traffic before its first scrape
    dns.table["gateway-internal"] = ["10.0.0.1", "10.0.0.3"]
    pods["10.0.0.1"].serve(0.2, 0.02, n=3)
    pods["10.0.0.2"].serve(0.2, 0.02, n=50)  # no longer listed: not scraped
    third = scraper.signals()
    assert third.requests == 3, "the new pod's lifetime is not this tick's window"
    assert len(dns.calls) == 3 and "http://10.0.0.2:8001/metrics" not in seen[4:]

    dns.table["gateway-internal"] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    pods["10.0.0.3"].serve(0.1, 0.01, n=4)
    fourth = scraper.signals()
    assert fourth.requests == 4, "the returning pod was forgotten: it counts from its next scrape again"


def test_https_gateways_are_scraped_by_name():
    hosts = []

    def answer(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return httpx.Response(200, text=FakeGateway().pool("decode", 1, 0, 0, 0).text())

    dns = StubDNS({"gw": ["10.0.0.1", "10.0.0.2"]})
    Scraper(["https://gw:8001"], transport=httpx.MockTransport(answer), resolve=dns).scrape()
    assert hosts == ["gw"] and dns.calls == []


def test_a_bad_port_is_refused_when_the_scraper_is_made():
    with pytest.raises(ValueError, match="gateway URL http://gw:80x/metrics"):
        Scraper(["http://gw:80x"], resolve=StubDNS())


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
