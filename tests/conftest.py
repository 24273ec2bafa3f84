"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvrelay.redis_server import redis_server


@pytest.fixture
def redis_url(tmp_path) -> Iterator[str]:
    """A fresh, empty redis-server for this test."""
    with redis_server(str(tmp_path)) as url:
        yield url
