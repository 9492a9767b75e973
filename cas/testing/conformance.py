"""The conformance suite of the backend contract in :mod:`cas.backends.base`.

Every backend runs the same tests. Subclass :class:`BackendConformance` in a
test module and provide a ``backend`` fixture that yields a fresh, empty
backend for each test::

    class TestMyBackend(BackendConformance):
        mtime_resolution = 1.0

        @pytest.fixture
        def backend(self, tmp_path):
            yield MyBackend(tmp_path)

Class attributes describe what a service is allowed to do differently:
``mtime_resolution`` (how coarse its modification times are) and
``known_gaps`` (test name -> reason, for a *test server* that lacks a feature
the real service has; those tests are strict xfails, so a fixed server shows
up as XPASS and fails the run until the gap is removed).

The suite needs pytest; import it from tests only.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar, TypeVar

import pytest

from ..backends.base import Backend
from ..errors import (
    AlreadyExistsError,
    InvalidInputError,
    InvalidKeyError,
    NotFoundError,
    PreconditionFailedError,
)

MiB = 1024 * 1024
#: Larger than one page of every service's listing (S3 and GCS: 1000 keys).
MANY_KEYS = 1100
#: Server clocks are compared with the local one only loosely: same machine
#: in tests, NTP-synchronised otherwise.
CLOCK_SKEW = 300.0
UNICODE_KEY = "deep/" * 20 + "ключ-✓.bin"
ODD_KEY = "odd/a b+c%41=d&e;f:g@h,i!j'k(l)m~n*o[p]q{r}s$t.bin"
INVALID_KEYS = [
    "",
    "/abs",
    "trailing/",
    "a//b",
    ".",
    "..",
    "a/./b",
    "a/../b",
    "nul\x00byte",
    ".cas-tmp-123",
    "a/.cas-tmp",
]

T = TypeVar("T")


def _race(workers: int, action: Callable[[int], T]) -> list[T | BaseException]:
    """Run ``action(i)`` in ``workers`` threads released at the same instant."""
    barrier = threading.Barrier(workers)

    def run(i: int) -> T | BaseException:
        barrier.wait()
        try:
            return action(i)
        except Exception as err:
            return err

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, range(workers)))


def _payload(i: int, size: int = 64) -> bytes:
    return (f"payload-{i}-".encode() * (size // 10 + 1))[:size]


class BackendConformance:
    """Checks every clause of the backend contract. Subclasses provide ``backend``."""

    #: Granularity of the service's modification times, in seconds (S3 and
    #: Azure report whole seconds).
    mtime_resolution: ClassVar[float] = 0.0
    #: Test name -> why the *test server* cannot pass it (strict xfail).
    known_gaps: ClassVar[dict[str, str]] = {}

    def leave_leftover(self, backend: Backend, key: str, data: bytes) -> bool:
        """Leave behind what a writer of ``key`` that died mid-write would leave.

        Subclasses of backends that can leave something (a temporary file, a
        partial upload) override this; False means the backend leaves nothing.
        """
        return False

    @pytest.fixture(autouse=True)
    def _mark_known_gaps(self, request: pytest.FixtureRequest) -> None:
        name = getattr(request.node, "originalname", request.node.name)
        reason = self.known_gaps.get(name)
        if reason:
            request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))

    # -- whole-object writes and reads ----------

    def test_put_get_round_trip(self, backend: Backend) -> None:
        backend.put("a/b/c.bin", b"hello")
        assert backend.get("a/b/c.bin") == b"hello"
        # Every buffer type the signature promises.
        backend.put("buf/bytearray", bytearray(b"\x00\x01\x02"))
        backend.put("buf/memoryview", memoryview(b"0123456789")[2:5])
        assert backend.get("buf/bytearray") == b"\x00\x01\x02"
        assert backend.get("buf/memoryview") == b"234"
        assert backend.exists("a/b/c.bin")
        assert not backend.exists("a/b/c")

    def test_prefetch_is_a_hint_that_never_fails(self, backend: Backend) -> None:
        backend.put("hinted/a", b"alpha")
        backend.prefetch(["hinted/a", "hinted/missing", "hinted/a"])
        backend.prefetch([])
        assert backend.get("hinted/a") == b"alpha"
        assert not backend.exists("hinted/missing")

    def test_empty_object(self, backend: Backend) -> None:
        backend.put("empty", b"")
        assert backend.get("empty") == b""
        assert backend.stat("empty").size == 0
        assert backend.get_range("empty", 0, 10) == b""
        data, token = backend.get_versioned("empty")
        assert data == b""
        assert token
        assert [(i.key, i.size) for i in backend.list_objects("empty")] == [("empty", 0)]

    def test_large_object(self, backend: Backend) -> None:
        data = os.urandom(10 * MiB)
        backend.put("large", data)
        assert backend.get("large") == data
        assert backend.stat("large").size == len(data)
        assert backend.get_range("large", 5 * MiB - 3, 7) == data[5 * MiB - 3 : 5 * MiB + 4]

    def test_overwrite(self, backend: Backend) -> None:
        backend.put("key", b"first version")
        backend.put("key", b"second")
        assert backend.get("key") == b"second"
        assert backend.stat("key").size == len(b"second")
        assert [i.key for i in backend.list_objects("key")] == ["key"]

    def test_writes_are_atomic_for_readers(self, backend: Backend) -> None:
        versions = [bytes([i]) * (2 * MiB) for i in range(2)]
        backend.put("atomic", versions[0])
        stop = threading.Event()
        seen: list[bytes] = []

        def read() -> None:
            while not stop.is_set():
                seen.append(backend.get("atomic"))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for i in range(6):
                backend.put("atomic", versions[i % 2])
        finally:
            stop.set()
            reader.join()
        assert seen
        assert all(value in versions for value in seen), "a reader saw a partial object"

    # -- create-only writes ----------

    def test_create_only(self, backend: Backend) -> None:
        backend.put("once", b"original", if_absent=True)
        with pytest.raises(AlreadyExistsError):
            backend.put("once", b"intruder", if_absent=True)
        assert backend.get("once") == b"original"
        with pytest.raises(FileExistsError):  # the builtin also catches it
            backend.put("once", b"intruder", if_absent=True)

    def test_create_only_large(self, backend: Backend) -> None:
        first, second = os.urandom(10 * MiB), os.urandom(10 * MiB)
        backend.put("big-once", first, if_absent=True)
        with pytest.raises(AlreadyExistsError):
            backend.put("big-once", second, if_absent=True)
        assert backend.get("big-once") == first

    def test_create_only_after_delete(self, backend: Backend) -> None:
        backend.put("again", b"1", if_absent=True)
        backend.delete(["again"])
        backend.put("again", b"2", if_absent=True)
        assert backend.get("again") == b"2"

    def test_create_only_race_has_one_winner(self, backend: Backend) -> None:
        payloads = [_payload(i, 4096) for i in range(8)]
        results = _race(8, lambda i: backend.put("race", payloads[i], if_absent=True))
        winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) == 1, f"{len(winners)} create-only writers won: {results}"
        assert all(isinstance(r, AlreadyExistsError) for r in losers), losers
        assert backend.get("race") == payloads[winners[0]]

    def test_if_absent_and_if_match_exclude_each_other(self, backend: Backend) -> None:
        with pytest.raises(InvalidInputError):
            backend.put("both", b"x", if_absent=True, if_match="token")

    # -- compare-and-swap ----------

    def test_compare_and_swap(self, backend: Backend) -> None:
        backend.put("ref", b"v1")
        data, token = backend.get_versioned("ref")
        assert data == b"v1"
        backend.put("ref", b"v2", if_match=token)
        assert backend.get("ref") == b"v2"
        with pytest.raises(PreconditionFailedError):
            backend.put("ref", b"stale", if_match=token)
        assert backend.get("ref") == b"v2"
        _, token2 = backend.get_versioned("ref")
        assert token2 != token

    def test_compare_and_swap_with_stat_token(self, backend: Backend) -> None:
        backend.put("ref", b"v1")
        token = backend.stat("ref").token
        assert token is not None
        backend.put("ref", b"v2", if_match=token)
        with pytest.raises(PreconditionFailedError):
            backend.put("ref", b"v3", if_match=token)
        assert backend.get("ref") == b"v2"

    def test_compare_and_swap_on_missing_object(self, backend: Backend) -> None:
        backend.put("ref", b"v1")
        _, token = backend.get_versioned("ref")
        backend.delete(["ref"])
        with pytest.raises(PreconditionFailedError):
            backend.put("ref", b"v2", if_match=token)
        with pytest.raises(NotFoundError):
            backend.get("ref")
        with pytest.raises(PreconditionFailedError):
            backend.put("never-written", b"x", if_match=token)
        assert not backend.exists("never-written")

    def test_compare_and_swap_race_has_one_winner(self, backend: Backend) -> None:
        backend.put("counter", b"0")
        _, token = backend.get_versioned("counter")
        payloads = [_payload(i) for i in range(8)]
        results = _race(8, lambda i: backend.put("counter", payloads[i], if_match=token))
        winners = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) == 1, f"{len(winners)} compare-and-swap writers won: {results}"
        assert all(isinstance(r, PreconditionFailedError) for r in losers), losers
        assert backend.get("counter") == payloads[winners[0]]

    # -- not found ----------

    def test_missing_keys_raise_not_found(self, backend: Backend) -> None:
        backend.put("present/x", b"x")
        calls: dict[str, Callable[[str], object]] = {
            "get": backend.get,
            "get_versioned": backend.get_versioned,
            "get_range": lambda k: backend.get_range(k, 0, 10),
            "stat": backend.stat,
            "touch": backend.touch,
        }
        for name, call in calls.items():
            for key in ("missing", "present/missing", "present/x/below-an-object"):
                with pytest.raises(NotFoundError) as info:
                    call(key)
                assert isinstance(info.value, FileNotFoundError), name
        assert not backend.exists("missing")
        backend.delete(["missing", "present/missing"])  # deleting nothing is fine
        backend.delete([])
        assert backend.get("present/x") == b"x"

    def test_delete_removes(self, backend: Backend) -> None:
        backend.put("gone", b"x")
        backend.put("kept", b"y")
        backend.delete(["gone"])
        with pytest.raises(NotFoundError):
            backend.get("gone")
        assert [i.key for i in backend.list_objects()] == ["kept"]

    def test_delete_in_time_sends_nothing_once_out_of_time(self, backend: Backend) -> None:
        keys = [f"timed/{i:02d}" for i in range(12)]
        for key in keys:
            backend.put(key, b"x")
        assert sorted(backend.delete_in_time(keys, lambda: False)) == keys
        assert [i.key for i in backend.list_objects("timed/")] == keys

        # In time for exactly one request: one request's worth goes, the rest
        # is returned and still there.
        answers = iter([True])
        unsent = backend.delete_in_time(keys, lambda: next(answers, False))
        left = [i.key for i in backend.list_objects("timed/")]
        assert sorted(unsent) == left
        group = getattr(backend, "delete_group", 1)
        assert len(keys) - len(left) == min(group, len(keys))

        assert backend.delete_in_time([*left, "timed/missing"], lambda: True) == []
        assert list(backend.list_objects("timed/")) == []

    # -- listing ----------

    def test_list_paginates_and_delete_batches(self, backend: Backend) -> None:
        keys = [f"many/{i:05d}" for i in range(MANY_KEYS)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: backend.put(k, k.encode()), keys))
        backend.put("manx", b"decoy before")
        backend.put("mano/x", b"decoy after")

        listed = list(backend.list_objects("many/"))
        assert [i.key for i in listed] == keys
        assert all(i.size == len(i.key) for i in listed)
        everything = [i.key for i in backend.list_objects()]
        assert everything == sorted([*keys, "manx", "mano/x"])

        backend.delete(iter(keys))  # one call, more keys than one service batch
        assert list(backend.list_objects("many/")) == []
        assert [i.key for i in backend.list_objects("man")] == ["mano/x", "manx"]

    def test_list_prefix_is_a_plain_string_prefix(self, backend: Backend) -> None:
        for key in ("refs/abc/x", "refs/abd", "refs/ab", "refs/a/b", "refsab", "ref"):
            backend.put(key, b"1")

        def keys(prefix: str) -> list[str]:
            return [i.key for i in backend.list_objects(prefix)]

        assert keys("refs/ab") == ["refs/ab", "refs/abc/x", "refs/abd"]
        assert keys("refs/abc") == ["refs/abc/x"]
        assert keys("refs/abc/") == ["refs/abc/x"]
        assert keys("refs/") == ["refs/a/b", "refs/ab", "refs/abc/x", "refs/abd"]
        assert keys("refs") == ["refs/a/b", "refs/ab", "refs/abc/x", "refs/abd", "refsab"]
        assert keys("refs/abc/x") == ["refs/abc/x"]
        assert keys("refs/nothing") == []
        assert keys("zzz") == []

    def test_list_uses_string_order(self, backend: Backend) -> None:
        keys = ["a/b", "a.b", "a-b", "a0", "a/c/d", "aa", "a_b", "A", "a~"]
        for key in keys:
            backend.put(key, b"")
        assert [i.key for i in backend.list_objects()] == sorted(keys)  # "a.b" < "a/b" < "a0"

    def test_list_reports_size_and_mtime(self, backend: Backend) -> None:
        backend.put("l/one", b"1")
        backend.put("l/three", b"333")
        infos = {i.key: i for i in backend.list_objects("l/")}
        assert {k: i.size for k, i in infos.items()} == {"l/one": 1, "l/three": 3}
        for key, info in infos.items():
            assert abs(info.mtime - backend.stat(key).mtime) <= max(self.mtime_resolution, 0.01)

    def test_list_empty(self, backend: Backend) -> None:
        assert list(backend.list_objects()) == []
        assert list(backend.list_objects("nothing/")) == []

    # -- modification times ----------

    def test_stat_reports_size_and_server_mtime(self, backend: Backend) -> None:
        before = time.time()
        backend.put("s", b"12345")
        info = backend.stat("s")
        assert info.key == "s"
        assert info.size == 5
        assert isinstance(info.mtime, float)
        # A naive datetime read as local time would be off by the UTC offset.
        assert abs(info.mtime - before) < CLOCK_SKEW, (info.mtime, before)
        assert info.token

    def test_touch_moves_mtime_forward(self, backend: Backend) -> None:
        backend.put("t", b"content")
        first = backend.stat("t").mtime
        # Just over one tick of the service's clock, so "now" is a later tick.
        time.sleep(self.mtime_resolution + 0.05)
        backend.touch("t")
        touched = backend.stat("t")
        assert touched.mtime > first
        assert abs(touched.mtime - time.time()) < CLOCK_SKEW
        assert backend.get("t") == b"content"
        assert touched.size == len(b"content")
        [listed] = backend.list_objects("t")
        assert abs(listed.mtime - touched.mtime) <= max(self.mtime_resolution, 0.01)

    # -- ranged reads ----------

    def test_get_range(self, backend: Backend) -> None:
        data = bytes(range(256)) * 4
        backend.put("r", data)
        assert backend.get_range("r", 0, 10) == data[:10]
        assert backend.get_range("r", 100, 50) == data[100:150]
        assert backend.get_range("r", 1000, 100) == data[1000:]  # past the end: shorter
        assert backend.get_range("r", 1023, 1) == data[1023:]
        assert backend.get_range("r", 1024, 10) == b""  # starts at the end
        assert backend.get_range("r", 5000, 10) == b""  # starts beyond the end
        assert backend.get_range("r", 10, 0) == b""

    # -- keys ----------

    def test_unicode_and_deep_keys(self, backend: Backend) -> None:
        backend.put(UNICODE_KEY, b"deep")
        backend.put(ODD_KEY, b"odd")
        assert backend.get(UNICODE_KEY) == b"deep"
        assert backend.get(ODD_KEY) == b"odd"
        assert backend.stat(UNICODE_KEY).size == 4
        assert [i.key for i in backend.list_objects("deep/deep/")] == [UNICODE_KEY]
        assert [i.key for i in backend.list_objects("odd/a b+")] == [ODD_KEY]
        assert [i.key for i in backend.list_objects()] == sorted([UNICODE_KEY, ODD_KEY])
        backend.touch(ODD_KEY)
        backend.delete([UNICODE_KEY, ODD_KEY])
        assert list(backend.list_objects()) == []

    def test_invalid_keys_are_rejected(self, backend: Backend) -> None:
        calls: dict[str, Callable[[str], object]] = {
            "put": lambda k: backend.put(k, b"x"),
            "put if_absent": lambda k: backend.put(k, b"x", if_absent=True),
            "get": backend.get,
            "get_versioned": backend.get_versioned,
            "get_range": lambda k: backend.get_range(k, 0, 1),
            "stat": backend.stat,
            "touch": backend.touch,
        }
        for key in INVALID_KEYS:
            for name, call in calls.items():
                try:
                    call(key)
                except InvalidKeyError:
                    continue
                pytest.fail(f"{name}({key!r}) did not raise InvalidKeyError")
        assert list(backend.list_objects()) == []

    # -- what dead writers leave ----------

    def test_leftovers_of_dead_writers_are_listed_and_removed(self, backend: Backend) -> None:
        backend.put("kept/a", b"alpha")
        backend.put("kept/b", b"beta", if_absent=True)
        assert list(backend.list_leftovers()) == [], "a finished write left something"
        backend.remove_leftovers([])
        before = time.time()
        if not self.leave_leftover(backend, "kept/c", b"x" * 1000):
            return  # this backend never leaves anything: nothing more to check
        [left] = backend.list_leftovers()
        assert left.size == 1000
        assert abs(left.mtime - before) < CLOCK_SKEW
        # Not an object: listings, reads and create-only writes do not see it.
        assert [i.key for i in backend.list_objects()] == ["kept/a", "kept/b"]
        assert not backend.exists("kept/c")
        backend.remove_leftovers([left])
        backend.remove_leftovers([left])  # gone already: fine
        assert list(backend.list_leftovers()) == []
        assert [i.key for i in backend.list_objects()] == ["kept/a", "kept/b"]
        assert backend.get("kept/a") == b"alpha"
        backend.put("kept/c", b"gamma", if_absent=True)
        assert backend.get("kept/c") == b"gamma"
