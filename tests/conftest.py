"""Shared pytest configuration. Fixture modules are registered as plugins below."""

import pytest

pytest_plugins = ["backend_fixtures", "ui_fixtures"]


@pytest.fixture(autouse=True)
def _own_chunk_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each test reads remote stores through a chunk cache of its own, never the user's."""
    monkeypatch.setenv("CAS_CACHE", str(tmp_path_factory.mktemp("chunk-cache")))
    monkeypatch.delenv("CAS_CACHE_SIZE", raising=False)
