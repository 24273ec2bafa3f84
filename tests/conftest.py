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


@pytest.fixture(scope="session", autouse=True)
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Every test, and every process a test starts, uses a repository of the session's own (the
    built-in model is registered there on first use), never the user's."""
    root = str(tmp_path_factory.mktemp("model-repo"))
    mp = pytest.MonkeyPatch()
    mp.setenv("KVRELAY_MODEL_REPO", root)
    yield root
    mp.undo()
