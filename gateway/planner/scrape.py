"""Reading the gateways' /metrics over HTTP(S), and turning successive scrapes into Signals.

/metrics may live on an internal port behind TLS or a proxy that wants a bearer token, so both
are supported. The token is read from its file at every scrape: mounted secrets rotate.

A name that resolves to several addresses (a headless Service: one per gateway pod) is scraped
once per address, re-resolved at every scrape, so that each gateway's histograms are windowed
against that same gateway's previous scrape and pods that come and go are followed. Plain http
only: an https URL keeps its name, because the certificate names the host, not each address, and
a URL naming an address would fail verification; list https gateways one URL each."""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from gateway.planner.signals import Scrape, Signals, combine, parse

log = logging.getLogger(__name__)

GetAddrInfo = Callable[..., Sequence[tuple[Any, ...]]]
"""socket.getaddrinfo, or a stand-in with its signature and result shape."""


def metrics_url(url: str) -> str:
    """A gateway's base URL (http://gw:8000) or its full /metrics URL, as the /metrics URL."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urlunsplit(parts)


def per_address(url: str, resolve: GetAddrInfo = socket.getaddrinfo) -> list[str]:
    """The URL once per address its host resolves to (scheme, port, path and query kept), or the
    URL itself: for https, an address literal, a name with one address, or one that does not
    resolve (then the scrape fails and says why). Addresses of one family only, the first the
    resolver prefers: a dual-stack Service names each pod once per family."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme != "http" or host is None or _is_address(host):
        return [url]
    try:
        infos = resolve(host, parts.port or 80, type=socket.SOCK_STREAM)
    except OSError as e:
        log.warning("could not resolve %s: %s", host, e)
        return [url]
    if not infos:
        return [url]
    family = infos[0][0]
    addresses = list(dict.fromkeys(info[4][0] for info in infos if info[0] == family))
    if len(addresses) < 2:
        return [url]
    userinfo = parts.netloc.rpartition("@")[0]
    urls = []
    for address in addresses:
        netloc = f"[{address}]" if ":" in address else address
        if parts.port is not None:
            netloc = f"{netloc}:{parts.port}"
        if userinfo:
            netloc = f"{userinfo}@{netloc}"
        urls.append(urlunsplit(parts._replace(netloc=netloc)))
    return urls


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Scraper:
    """Scrapes every gateway each tick and keeps the last scrape of each, so that latency
    percentiles cover exactly the interval since the previous tick."""

    def __init__(
        self,
        urls: list[str],
        token_file: str | None = None,
        ca_file: str | None = None,
        timeout_s: float = 5.0,
        transport: httpx.BaseTransport | None = None,
        resolve: GetAddrInfo = socket.getaddrinfo,
    ) -> None:
        if not urls:
            raise ValueError("give at least one gateway URL to scrape")
        self.urls = [metrics_url(u) for u in urls]
        for url in self.urls:
            try:
                urlsplit(url).port  # noqa: B018 - reading it raises for a port that is no number
            except ValueError as e:
                raise ValueError(f"gateway URL {url}: {e}") from e
        self._token_file = Path(token_file) if token_file else None
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._client = httpx.Client(verify=verify, timeout=timeout_s, transport=transport)
        self._resolve = resolve
        self._previous: dict[str, Scrape] = {}

    def targets(self) -> list[str]:
        """The URLs to scrape now: each configured one, expanded per address."""
        out = (t for url in self.urls for t in per_address(url, self._resolve))
        return list(dict.fromkeys(out))

    def scrape(self) -> dict[str, Scrape]:
        """Each gateway that answered, by the URL it was scraped at. One that does not is logged
        and left out."""
        return self._scrape(self.targets())

    def _scrape(self, targets: list[str]) -> dict[str, Scrape]:
        headers = {}
        if self._token_file is not None:
            headers["Authorization"] = f"Bearer {self._token_file.read_text().strip()}"
        out = {}
        for url in targets:
            try:
                resp = self._client.get(url, headers=headers)
                resp.raise_for_status()
                out[url] = parse(resp.text)
            except (httpx.HTTPError, ValueError) as e:
                log.warning("could not scrape %s: %s", url, e)
        return out

    def signals(self) -> Signals | None:
        """This tick's Signals (latency over the interval since the last call); None when no
        gateway answered, which the policy treats as 'hold', never as 'no traffic'."""
        targets = self.targets()
        current = self._scrape(targets)
        if not current:
            return None
        signals = combine(current, self._previous)
        # A gateway that missed this tick keeps its last scrape; one no longer listed (a pod gone,
        # its address no longer resolved) is forgotten, or every rollout would leave some behind.
        merged = {**self._previous, **current}
        self._previous = {url: merged[url] for url in targets if url in merged}
        return signals

    def snapshot(self) -> Signals | None:
        """Signals from one scrape, latency over everything each gateway has seen since it started."""
        current = self.scrape()
        return combine(current, None) if current else None

    def close(self) -> None:
        self._client.close()
