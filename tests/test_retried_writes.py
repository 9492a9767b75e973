"""Conditional writes whose answer was lost, as an SDK's retry reports them.

The cloud SDKs retry a request whose answer did not arrive. When the first
attempt of a create-only or compare-and-swap write did succeed, the retry
finds the object already written and reports a conflict for a write that
was in fact made. Every caller of a conditional write must take that for
the success it was (docs/backends.md, "Retries").
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from helpers import KiB, random_bytes

from cas.backends import Backend, BytesLike, DelegatingBackend, MemoryBackend
from cas.chunks._chunking import ChunkerParams
from cas.errors import AlreadyExistsError, PreconditionFailedError
from cas.gc._session import read_settings, write_settings
from cas.repository import _layout as layout
from cas.store import Store
from cas.store._config import StoreConfig, load_config, write_config


class LosesAnswers(DelegatingBackend):
    """Makes a conditional write, then reports the conflict a retry would.

    Only the first such write in each folder of keys loses its answer: the
    next version number of a key is then answered, so a caller that took the
    conflict for a lost race would record a second version, not loop forever.
    """

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.lost: list[str] = []
        self._lock = threading.Lock()

    def put(
        self, key: str, data: BytesLike, *, if_absent: bool = False, if_match: str | None = None
    ) -> None:
        self.inner.put(key, data, if_absent=if_absent, if_match=if_match)
        if not if_absent and if_match is None:
            return
        folder = key.rpartition("/")[0]
        with self._lock:
            if any(lost.rpartition("/")[0] == folder for lost in self.lost):
                return
            self.lost.append(key)
        if if_absent:
            raise AlreadyExistsError(f"object {key!r} already exists")
        raise PreconditionFailedError(f"object {key!r} changed since read")


def test_a_store_created_through_a_lost_answer_is_this_creation() -> None:
    backend = LosesAnswers(MemoryBackend())
    config = StoreConfig()
    assert write_config(backend, config, exist_ok=False) == config
    assert backend.lost == [layout.CONFIG_KEY]


def test_a_put_whose_conditional_writes_lose_their_answers_commits_one_version(
    tmp_path: Path,
) -> None:
    inner = MemoryBackend()
    write_config(inner, StoreConfig(chunker=ChunkerParams.from_average(16 * KiB)), exist_ok=False)
    backend = LosesAnswers(inner)
    store = Store(backend, load_config(backend, create=False))
    data = random_bytes(300 * KiB, 11)
    (tmp_path / "w.bin").write_bytes(data)

    store.put(tmp_path / "w.bin", "w")

    assert any(key.startswith(layout.CHUNKS) for key in backend.lost)
    assert layout.version_key("w", 1) in backend.lost
    assert [v.number for v in store.log("w")] == [1], "the lost answer made no second version"
    assert store.verify(deep=True).ok
    store.get("w", tmp_path / "out.bin")
    assert (tmp_path / "out.bin").read_bytes() == data


@pytest.mark.parametrize("existing", [False, True], ids=["create", "swap"])
def test_a_gc_setting_written_through_a_lost_answer_holds(existing: bool) -> None:
    inner = MemoryBackend()
    if existing:
        write_settings(inner, 100.0)
    backend = LosesAnswers(inner)
    assert write_settings(backend, 50.0).grace == 50.0
    assert read_settings(inner).grace == 50.0
    assert len(backend.lost) == 1
