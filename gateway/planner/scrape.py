"""Reading the gateways' /metrics over HTTP(S), and turning successive scrapes into Signals.

/metrics may live on an internal port behind TLS or a proxy that wants a bearer token, so both
are supported. The token is read from its file at every scrape: mounted secrets rotate."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from gateway.planner.signals import Scrape, Signals, combine, parse

log = logging.getLogger(__name__)


def metrics_url(url: str) -> str:
    """A gateway's base URL (http://gw:8000) or its full /metrics URL, as the /metrics URL."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urlunsplit(parts)


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
    ) -> None:
        if not urls:
            raise ValueError("give at least one gateway URL to scrape")
        self.urls = [metrics_url(u) for u in urls]
        self._token_file = Path(token_file) if token_file else None
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True
        self._client = httpx.Client(verify=verify, timeout=timeout_s, transport=transport)
        self._previous: dict[str, Scrape] = {}

    def scrape(self) -> dict[str, Scrape]:
        """Each gateway that answered, by URL. One that does not is logged and left out."""
        headers = {}
        if self._token_file is not None:
            headers["Authorization"] = f"Bearer {self._token_file.read_text().strip()}"
        out = {}
        for url in self.urls:
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
        current = self.scrape()
        if not current:
            return None
        signals = combine(current, self._previous)
        self._previous.update(current)
        return signals

    def snapshot(self) -> Signals | None:
        """Signals from one scrape, latency over everything each gateway has seen since it started."""
        current = self.scrape()
        return combine(current, None) if current else None

    def close(self) -> None:
        self._client.close()
