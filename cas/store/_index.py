"""The catalog kept in the store: a checkpoint of every live version, and the log since.

Objects (docs/format.md, "The catalog"):

* ``catalog/checkpoints/<h>.parquet``: every live version and its current
  tags as of a compaction; ``h`` is the BLAKE3 of the file, which is
  written create-only and never changed.
* ``catalog/head``: which checkpoint is current, and the notes it folded
  in; replaced by compare-and-swap only.
* ``catalog/log/...``: one note per change of a ref since (:mod:`cas.repository._changes`).

**A query** reads the head, the checkpoint (unless this process or this
machine holds it already), lists the log and reads the head again; if the
head moved, it starts over. For every note the head has not folded in, it
reads the ref the note names: the refs stay the truth, the checkpoint only
spares reading those that did not change. Its requests do not grow with
the store, only with the changes since the last compaction.

**Compaction** needs no lock: it reads the backend's clock, lists the log,
reads the refs named by notes older than :data:`~cas.repository._changes.SETTLE`
(whose changes have landed), writes a new checkpoint, and replaces the head
only if it is still the one it started from. Then it deletes the notes it
folded in. Two at once: one wins the swap, the other changes nothing. A crash
before the swap leaves an unused checkpoint file; after it, notes the head
names as folded, which queries skip and the next compaction deletes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backends.base import Backend
from ..digest import Digest
from ..errors import (
    AlreadyExistsError,
    CasError,
    CorruptObjectError,
    IntegrityError,
    NotFoundError,
    PreconditionFailedError,
    RefNotFoundError,
    UnsafePathError,
)
from ..repository import _changes as changes
from ..repository._changes import CATALOG, Note
from ..repository._manifest import canonical_json
from ..repository._metadata import Summary
from ..repository._refs import Refs, VersionRef, utc_now
from . import _catalog_table as table
from ._catalog_table import CatalogDamaged, Raw
from ._values import Version

HEAD = CATALOG + "head"
CHECKPOINTS = CATALOG + "checkpoints/"
CLOCK = CATALOG + "clock"
#: A query that reads more notes than this old enough to fold compacts the catalog.
COMPACT_AFTER = 512
_ATTEMPTS = 6

Describe = Callable[[VersionRef], Summary]


@dataclass(frozen=True, slots=True)
class Head:
    checkpoint: str
    folded: frozenset[str]
    generation: int

    @classmethod
    def parse(cls, blob: bytes) -> Head:
        try:
            data = json.loads(blob)
            checkpoint = Digest.parse(data["checkpoint"]).hex
            folded = data["folded"]
            generation = data["generation"]
            if not isinstance(folded, list) or not all(isinstance(n, str) for n in folded):
                raise ValueError("folded is not a list of names")
            if type(generation) is not int or data.get("format") != table.TABLE_FORMAT:
                raise ValueError("bad generation or format")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError, CasError) as err:
            raise CatalogDamaged(f"{HEAD} is malformed ({err})") from None
        return cls(checkpoint, frozenset(folded), generation)

    def to_bytes(self) -> bytes:
        return canonical_json(
            {
                "format": table.TABLE_FORMAT,
                "checkpoint": self.checkpoint,
                "folded": sorted(self.folded),
                "generation": self.generation,
                "created": utc_now(),
            }
        )


@dataclass
class State:
    """Live versions (without their tags) and tags: a checkpoint, with the changes since
    read from the refs. Rows of a checkpoint are read when first asked for."""

    versions: dict[tuple[str, int], Raw | Version] = field(default_factory=dict)
    tags: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Tags read from their refs in this state (the others come from a checkpoint);
    #: versions read from their refs are those not held as a :class:`Raw` row.
    tags_read: set[tuple[str, str]] = field(default_factory=set)
    #: Rows and tags of the checkpoint found equal to their refs by a query's spot
    #: checks (:mod:`._catalog_trust`): shared by the copies of a checkpoint's state.
    confirmed: set[tuple[str, int | str]] = field(default_factory=set)
    # Worked out once per state: a process asks the same state many questions.
    _order: list[tuple[str, int]] | None = field(default=None, init=False, repr=False)
    _tagged: dict[tuple[str, int], list[str]] | None = field(default=None, init=False, repr=False)
    _by_key: dict[str, list[int]] | None = field(default=None, init=False, repr=False)

    def copy(self) -> State:
        return State(dict(self.versions), dict(self.tags), set(self.tags_read), self.confirmed)

    def changed(self) -> None:
        self._order = self._tagged = self._by_key = None

    def numbers(self, key: str) -> list[int]:
        """The live version numbers of ``key``."""
        if self._by_key is None:
            by_key: dict[str, list[int]] = {}
            for name, number in self.versions:
                by_key.setdefault(name, []).append(number)
            self._by_key = by_key
        return self._by_key.get(key, [])

    def tags_by_version(self) -> dict[tuple[str, int], list[str]]:
        if self._tagged is None:
            out: dict[tuple[str, int], list[str]] = {}
            for (key, tag), number in sorted(self.tags.items()):
                if (key, number) in self.versions:
                    out.setdefault((key, number), []).append(tag)
            self._tagged = out
        return self._tagged

    def ordered(self) -> list[tuple[str, int]]:
        """Every live version by key, newest first, in the order of a listing of refs/
        (a key's versions before those of ``KEY/...``)."""
        if self._order is None:
            with table.bulk():
                self._order = sorted(self.versions, key=lambda named: (named[0] + "/", -named[1]))
        return self._order

    def read(self, chosen: Sequence[tuple[str, int]]) -> list[Version]:
        """The versions ``chosen`` names, without tags (CatalogDamaged if a row fails)."""
        entries = [self.versions[named] for named in chosen]
        table.parse_all([e for e in entries if isinstance(e, Raw)])
        return [e.version() if isinstance(e, Raw) else e for e in entries]


def checkpoint_key(hex_digest: str) -> str:
    return f"{CHECKPOINTS}{hex_digest}.parquet"


# The last checkpoint this process decoded: repeated queries (a page, a
# training loop asking for the best version) decode it once.
_DECODED: dict[tuple[str, str], State] = {}


class Index:
    """The catalog of one store: answers which versions are live, and compacts itself."""

    def __init__(
        self,
        backend: Backend,
        refs: Refs,
        describe: Describe,
        scan: Callable[[], State],
        workers: int,
    ) -> None:
        self.backend = backend
        self.refs = refs
        self.describe = describe
        self.scan = scan  # every live version read from the refs: the catalog rebuilt
        self.workers = workers

    # -- queries -------------------------------------------------------------------

    def snapshot(self) -> State:
        """Every live version and tag as of now; CatalogUnavailable without pyarrow."""
        table.require()
        for _ in range(_ATTEMPTS):
            head = self._read_head()
            if head is None:
                self.compact(full=True)
                continue
            try:
                state = self._load(head.checkpoint)
            except NotFoundError:
                continue  # replaced and removed since the head was read: read it again
            except CatalogDamaged:
                self.compact(full=True)
                continue
            notes = self.refs.changes.list()
            if self._read_head() != head:
                continue  # a compaction may have removed notes we did not see: again
            pending = [n for n in notes if n.name not in head.folded]
            if pending:
                state = state.copy()
                self._apply(state, pending)
            if len(pending) > COMPACT_AFTER:
                self._compact_quietly()
            return state
        raise CatalogDamaged("the catalog kept changing or kept failing its checks; try again")

    def _read_head(self) -> Head | None:
        try:
            return Head.parse(self.backend.get(HEAD))
        except NotFoundError:
            return None
        except CatalogDamaged:
            self.compact(full=True)
            return Head.parse(self.backend.get(HEAD))

    def _load(self, hex_digest: str) -> State:
        memo = (self.backend.uri, hex_digest)
        if memo in _DECODED:
            return _DECODED[memo]
        blob = self._fetch(hex_digest)
        raws, tags = table.decode(blob, name=checkpoint_key(hex_digest))
        versions: dict[tuple[str, int], Raw | Version] = {(r.key, r.number): r for r in raws}
        state = State(versions, tags)
        _DECODED.clear()
        _DECODED[memo] = state
        return state

    def _fetch(self, hex_digest: str) -> bytes:
        cached = _cache_path(self.backend, hex_digest)
        if cached is not None and cached.is_file():
            blob = cached.read_bytes()
            if Digest.of(blob).hex == hex_digest:
                return blob
        blob = self.backend.get(checkpoint_key(hex_digest))
        if Digest.of(blob).hex != hex_digest:
            raise CatalogDamaged(f"{checkpoint_key(hex_digest)} does not match its hash")
        if cached is not None:
            _write_cache(cached, blob)
        return blob

    def _apply(self, state: State, notes: Iterable[Note]) -> None:
        """Read the ref each note names, and make ``state`` say what it says."""
        state.changed()
        unique = list({(n.key, n.version, n.tag): n for n in notes}.values())
        if len(unique) <= 1 or self.workers <= 1:
            results = [self._truth(note) for note in unique]
        else:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="cas-catalog") as pool:
                results = list(pool.map(self._truth, unique))
        for note, result in zip(unique, results, strict=True):
            if note.version is not None:
                state.versions.pop((note.key, note.version), None)
                if isinstance(result, Version):
                    state.versions[(note.key, note.version)] = result
            elif note.tag is not None:
                state.tags.pop((note.key, note.tag), None)
                state.tags_read.add((note.key, note.tag))
                if isinstance(result, int):
                    state.tags[(note.key, note.tag)] = result

    def _truth(self, note: Note) -> Version | int | None:
        if note.version is not None:
            ref = self.refs.read_live(note.key, note.version)
            return None if ref is None else Version.of(ref, self.describe(ref), ())
        assert note.tag is not None
        try:
            return self.refs.read_tag(note.key, note.tag)
        except (RefNotFoundError, CorruptObjectError):
            return None  # removed, or names no version: left out, as everywhere

    # -- compaction ----------------------------------------------------------------

    def _compact_quietly(self) -> None:
        with contextlib.suppress(CasError):  # a read-only store: the next query tries again
            self.compact()

    def compact(self, *, full: bool = False) -> bool:
        """Fold the settled notes into a new checkpoint; ``full`` reads every ref instead
        of the last checkpoint. False when another compaction replaced the head first."""
        now = self._backend_now()
        notes = self.refs.changes.list()
        settled = [n for n in notes if changes.settled(n, now)]
        head, token = self._head_versioned()
        state: State | None = None
        if not full and head is not None:
            try:
                state = self._load(head.checkpoint)
            except (NotFoundError, CatalogDamaged):
                state = None
        scanned = state is None
        if state is None:
            state = self.scan()
        else:
            state = state.copy()
            self._apply(state, [n for n in settled if n.name not in head.folded])  # type: ignore[union-attr]
        blob = table.encode(state.read(list(state.versions)), state.tags_by_version())
        digest = Digest.of(blob).hex
        self._write_checkpoint(digest, blob)
        generation = head.generation + 1 if head is not None else 1
        new_head = Head(digest, frozenset(n.name for n in settled), generation)
        try:
            if token is None:
                self.backend.put(HEAD, new_head.to_bytes(), if_absent=True)
            else:
                self.backend.put(HEAD, new_head.to_bytes(), if_match=token)
        except (AlreadyExistsError, PreconditionFailedError):
            return False
        if scanned:  # every row just read from its ref: what the checkpoint holds, believed
            _DECODED.clear()
            _DECODED[(self.backend.uri, digest)] = state
        self.backend.delete([n.name for n in settled])
        self._remove_old_checkpoints(digest, now)
        return True

    def _write_checkpoint(self, digest: str, blob: bytes) -> None:
        name = checkpoint_key(digest)
        try:
            self.backend.put(name, blob, if_absent=True)
        except AlreadyExistsError:
            # The same state, written before: same name, same bytes, unless damaged since.
            if Digest.of(self.backend.get(name)).hex != digest:
                self.backend.put(name, blob)

    def _head_versioned(self) -> tuple[Head | None, str | None]:
        try:
            blob, token = self.backend.get_versioned(HEAD)
        except NotFoundError:
            return None, None
        try:
            return Head.parse(blob), token
        except CatalogDamaged:
            return None, token  # replaced whole by this compaction

    def _backend_now(self) -> float:
        self.backend.put(CLOCK, b"")
        return self.backend.stat(CLOCK).mtime

    def _remove_old_checkpoints(self, current: str, now: float) -> None:
        # A checkpoint another compaction is about to name is younger than SETTLE.
        old = [
            info.key
            for info in self.backend.list_objects(CHECKPOINTS)
            if info.key != checkpoint_key(current) and info.mtime < now - changes.SETTLE
        ]
        self.backend.delete(old)


def _cache_path(backend: Backend, hex_digest: str) -> Path | None:
    """Where this machine keeps checkpoints of remote stores (they are named by their hash)."""
    if not backend.remote:
        return None
    root = os.environ.get("CAS_CATALOG_CACHE")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(base, "cas", "catalog")
    return Path(root) / f"{hex_digest}.parquet"


def _write_cache(path: Path, blob: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(blob)
        os.replace(temporary, path)
    except OSError:
        pass  # a cache that cannot be written is only slower


def state_of(versions: Iterable[Version]) -> State:
    """The state of versions read from the refs (with their current tags)."""
    state = State()
    for version in versions:
        state.versions[(version.key, version.number)] = dataclasses.replace(version, tags=())
        for tag in version.tags:
            state.tags[(version.key, tag)] = version.number
    state.tags_read.update(state.tags)
    return state


@dataclass(frozen=True, slots=True)
class CatalogStatus:
    """What the catalog holds: its checkpoint, and the notes not folded in yet."""

    checkpoint: str | None  # BLAKE3 of the current checkpoint file; None: no catalog yet
    checkpoint_bytes: int
    versions: int  # live versions in the checkpoint
    tags: int
    pending: int  # notes a query reads the refs of
    generation: int
    #: After a check: the first difference between the catalog and the refs, if any.
    problem: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "checkpoint_bytes": self.checkpoint_bytes,
            "versions": self.versions,
            "tags": self.tags,
            "pending_notes": self.pending,
            "generation": self.generation,
            "problem": self.problem,
        }


def status(index: Index) -> CatalogStatus:
    """The catalog as it stands (its checkpoint read and checked)."""
    table.require()
    for _ in range(_ATTEMPTS):
        head = index._read_head()
        pending = index.refs.changes.list()
        if head is None:
            return CatalogStatus(None, 0, 0, 0, len(pending), 0)
        try:
            state = index._load(head.checkpoint)
            size = index.backend.stat(checkpoint_key(head.checkpoint)).size
        except NotFoundError:
            continue  # replaced by a compaction since the head was read
        unfolded = sum(1 for note in pending if note.name not in head.folded)
        return CatalogStatus(
            head.checkpoint, size, len(state.versions), len(state.tags), unfolded, head.generation
        )
    raise CatalogDamaged("the catalog kept changing while it was read; try again")


def difference(view: State, truth: State) -> str | None:
    """The first way the catalog's ``view`` differs from the ``truth`` read from the refs."""
    common = sorted(view.versions.keys() & truth.versions.keys())
    seen_all = dict(zip(common, view.read(common), strict=True))
    for named in sorted(view.versions.keys() | truth.versions.keys()):
        label = f"{named[0]}@{named[1]}"
        if named not in truth.versions:
            return f"the catalog lists {label}, which is not a live version"
        if named not in view.versions:
            return f"the catalog misses live version {label}"
        seen, [real] = seen_all[named], truth.read([named])
        if seen.manifest_id != real.manifest_id or seen.created != real.created:
            return f"the catalog's {label} names another manifest or time than its ref"
        if Summary.to_dict(seen) != Summary.to_dict(real):
            return f"the catalog's {label} describes it otherwise than its ref"
    seen_tags, real_tags = view.tags_by_version(), truth.tags_by_version()
    for named in sorted(seen_tags.keys() | real_tags.keys()):
        if seen_tags.get(named) != real_tags.get(named):
            return f"the catalog's tags of {named[0]}@{named[1]} are not what the refs say"
    return None


def check(index: Index) -> CatalogStatus:
    """Compare the catalog with every ref; rebuild it when they disagree (twice, to be
    sure a concurrent change was not the cause)."""
    problem = None
    for _ in range(2):
        try:
            truth = index.scan()
            problem = difference(index.snapshot(), truth)
        except (IntegrityError, UnsafePathError):
            break  # a damaged version, which verify reports: nothing to compare it with
        if problem is None:
            break
    if problem is not None:
        index.compact(full=True)
    return dataclasses.replace(status(index), problem=problem)
