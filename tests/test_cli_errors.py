"""Bad input on the command line: a clear one-line message and exit code 2, nothing written."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import build_sample_tree, ok, run_cas, small_store, snapshot

import cas
from cas.digest import Digest
from cas.repository import _layout as layout
from cas.repository._manifest import ArtifactKind, Entry, Manifest
from cas.repository._refs import utc_now


def assert_usage_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("cas: error: ") or "usage:" in proc.stderr, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, Path]:
    store = tmp_path / "store"
    s = small_store(store)
    tree = build_sample_tree(tmp_path / "tree")
    s.put(tree, "k", tags=["best"])
    return store, tree


def versions(store: Path, key: str = "k") -> list[int]:
    return [v.number for v in cas.open(store, create=False).log(key)]


# -- put ------------------------------------------------------------------------------


def test_missing_path(env: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = env
    proc = run_cas("put", tmp_path / "no-such-dir", "k", store=store)
    assert_usage_error(proc, "does not exist", "no-such-dir")
    assert versions(store) == [1]


def test_unreadable_path(env: tuple[Path, Path], tmp_path: Path) -> None:
    store, tree = env
    secret = tree / "secret.bin"
    secret.write_bytes(b"top secret")
    secret.chmod(0)
    try:
        if os.access(secret, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop root from reading")
        proc = run_cas("put", secret, "k", store=store)
        assert_usage_error(proc, "cannot read", "secret.bin")
        proc = run_cas("put", tree, "k", store=store)
        assert_usage_error(proc, "cannot read", "secret.bin")
        assert versions(store) == [1]
    finally:
        secret.chmod(0o600)


def test_special_files_and_escaping_links_are_refused(
    env: tuple[Path, Path], tmp_path: Path
) -> None:
    store, tree = env
    os.mkfifo(tree / "pipe")
    assert_usage_error(run_cas("put", tree, "k", store=store), "special file", "pipe")
    (tree / "pipe").unlink()
    (tree / "escape").symlink_to("../../outside")
    assert_usage_error(run_cas("put", tree, "k", store=store), "outside", "escape")
    assert versions(store) == [1]


def test_file_name_that_is_not_utf8(env: tuple[Path, Path]) -> None:
    # Linux allows any bytes in a name; a manifest holds UTF-8 text. Such a name must be
    # reported as bad input (or stored faithfully), never crash the put with a traceback.
    store, tree = env
    odd = os.path.join(os.fsencode(tree), b"bad\xffname.bin")
    with open(odd, "wb") as f:
        f.write(b"data")
    proc = run_cas("put", tree, "k", store=store)
    if proc.returncode == 0:  # stored: then it must come back under the same bytes
        out = tree.parent / "out"
        ok(run_cas("get", "k", out, store=store))
        assert b"bad\xffname.bin" in os.listdir(os.fsencode(out))
    else:
        assert_usage_error(proc, "name.bin")
        assert versions(store) == [1]


@pytest.mark.parametrize("key", ["bad key", "a//b", "/abs", "../up", "k@1", "k:tag", "ü"])
def test_malformed_key_on_put(env: tuple[Path, Path], key: str) -> None:
    store, tree = env
    assert_usage_error(run_cas("put", tree, key, store=store), "invalid")


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("a//b", ["empty segment", "single '/'"]),
        ("/abs/key", ["leading '/'"]),
        ("a/b/", ["trailing '/'"]),
        ("a/../b", ["'..' is not allowed"]),
        ("a/b c", ["'b c'", "letters, digits"]),
    ],
)
def test_a_malformed_key_says_what_is_wrong(
    env: tuple[Path, Path], key: str, words: list[str]
) -> None:
    store, tree = env
    proc = run_cas("put", tree, key, store=store)
    assert_usage_error(proc, *words)
    assert "segment ''" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--tag", "123"], ["invalid tag"]),
        (["--tag", "a b"], ["invalid tag"]),
        (["--metric", "loss"], ["NAME=VALUE"]),
        (["--metric", "loss=low"], ["not a number"]),
        (["--metric", "loss=nan"], ["finite"]),
        (["--metric", "loss=inf"], ["finite"]),
        (["--meta", "novalue"], ["NAME=VALUE"]),
        (["--meta", "x=NaN"], ["JSON"]),
        (["--parent", "k@9"], ["k@9"]),
        (["--parent", "nothing"], ["nothing"]),
        (["--parent", "k:nope"], ["k:nope"]),
        (["--parent", "k@x"], ["invalid reference"]),
    ],
)
def test_bad_put_options(env: tuple[Path, Path], args: list[str], words: list[str]) -> None:
    store, tree = env
    assert_usage_error(run_cas("put", tree, "k", *args, store=store), *words)
    assert versions(store) == [1]


# -- references ------------------------------------------------------------------------


# The full syntax is unit-tested in test_layout.py; these go through the CLI.
BAD_REFS = ["k@", "k@0", "k@x", "k@1:best", "k:12", "bad key", "@1", "k@²"]


@pytest.mark.parametrize("ref", BAD_REFS)
def test_malformed_ref_on_get(env: tuple[Path, Path], tmp_path: Path, ref: str) -> None:
    store, _ = env
    assert_usage_error(run_cas("get", ref, tmp_path / "out", store=store), "invalid")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ref", ["k@0", "k:12", "a//b@1"])
def test_malformed_ref_on_other_commands(env: tuple[Path, Path], ref: str) -> None:
    store, _ = env
    for args in (
        ["show", ref],
        ["rm", ref],
        ["tag", ref, "t"],
        ["put", env[1], "k", "--parent", ref],
    ):
        assert_usage_error(run_cas(*args, store=store), "invalid")
    assert versions(store) == [1]


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        ("nothing", ["nothing", "no versions"]),
        ("k@7", ["k@7", "does not exist"]),
        ("k:nope", ["k:nope", "does not exist"]),
        ("other/key@1", ["other/key@1"]),
    ],
)
def test_unknown_key_version_tag(
    env: tuple[Path, Path], tmp_path: Path, ref: str, words: list[str]
) -> None:
    store, _ = env
    out = tmp_path / "out"
    assert_usage_error(run_cas("get", ref, out, store=store), *words)
    assert not out.exists()
    assert_usage_error(run_cas("show", ref, store=store), *words)
    if ref.startswith("k"):
        assert_usage_error(run_cas("rm", ref, store=store), *words)
        assert_usage_error(run_cas("tag", ref, "t", store=store), *words)
    else:
        assert_usage_error(run_cas("log", ref.partition("@")[0], store=store), "no versions")
    assert versions(store) == [1]


def test_deleted_version_and_untag_unknown(env: tuple[Path, Path], tmp_path: Path) -> None:
    store, tree = env
    cas.open(store).put(tree, "k")
    ok(run_cas("rm", "k@2", store=store))
    assert_usage_error(run_cas("get", "k@2", tmp_path / "o", store=store), "k@2")
    assert_usage_error(run_cas("tag", "k", "nope", "--delete", store=store), "k:nope")
    assert_usage_error(run_cas("rm", "k@1", "--all", store=store), "--all")
    assert_usage_error(run_cas("log", "bad key", store=store), "invalid")


# -- destinations and stores ------------------------------------------------------------------


def test_dest_exists(env: tuple[Path, Path], tmp_path: Path) -> None:
    store, _ = env
    for dest in (tmp_path / "dir", tmp_path / "file", tmp_path / "link"):
        if dest.name == "dir":
            dest.mkdir()
            (dest / "keep").write_text("keep")
        elif dest.name == "file":
            dest.write_text("keep")
        else:
            dest.symlink_to("nowhere")
        before = snapshot(dest) if not dest.is_symlink() else os.readlink(dest)
        assert_usage_error(run_cas("get", "k", dest, store=store), "already exists", dest.name)
        after = snapshot(dest) if not dest.is_symlink() else os.readlink(dest)
        assert after == before


def test_store_that_is_not_a_store(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-store"
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n")
    tree = build_sample_tree(tmp_path / "tree")
    for args in (["put", tree, "k"], ["get", "k", tmp_path / "o"], ["ls"], ["log", "k"],
                 ["stats"], ["verify"], ["init"]):  # fmt: skip
        assert_usage_error(run_cas(*args, store=folder), "not-a-store")
    assert sorted(os.listdir(folder)) == ["data.csv"]
    # A file where the store should be.
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_usage_error(run_cas("put", tree, "k", store=afile), "afile")
    assert afile.read_text() == "x"


def test_a_store_location_that_cannot_be_made_names_the_path_and_the_reason(
    tmp_path: Path,
) -> None:
    if os.path.isdir("/proc"):  # a file system where no folder can be made
        assert_usage_error(run_cas("init", store="/proc/x"), "/proc/x", "No such file")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_usage_error(run_cas("init", store=afile / "store"), f"{afile}", "Not a directory")
    assert afile.read_text() == "x"


def test_store_with_a_foreign_config(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config").write_text("this is not json")
    assert_usage_error(run_cas("ls", store=folder), "config")
    (folder / "config").write_text('{"format": 99}')
    assert_usage_error(run_cas("ls", store=folder), "format")


def test_bad_init_options(tmp_path: Path) -> None:
    assert_usage_error(run_cas("init", "--chunk-avg", "10", store=tmp_path / "a"), "chunk")
    assert_usage_error(run_cas("init", "--chunk-avg", "lots", store=tmp_path / "b"), "size")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_unknown_scheme(tmp_path: Path) -> None:
    assert_usage_error(run_cas("ls", store="ftp://host/x"), "scheme")


@pytest.mark.parametrize(
    ("location", "form"),
    [
        ("s3:/x", "s3://bucket/prefix"),
        ("s3:bucket/x", "s3://bucket/prefix"),
        ("S3:/x", "s3://bucket/prefix"),
        ("gs:/b/p", "gs://bucket/prefix"),
        ("az:x", "az://container/prefix"),
        ("file:/x", "file:///"),
    ],
)
def test_a_mistyped_cloud_location_is_not_a_local_folder(
    tmp_path: Path, location: str, form: str
) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(b"weights")
    proc = run_cas("put", src, "k", store=location, cwd=tmp_path)
    assert_usage_error(proc, form, f"./{location}")
    assert os.listdir(tmp_path) == ["model.bin"]


def test_a_local_folder_named_like_a_location_is_written_as_a_path(tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(b"weights")
    ok(run_cas("put", src, "k", store="./s3:/x", cwd=tmp_path))
    ok(run_cas("put", src, "k", store=(tmp_path / "gs:b").as_uri(), cwd=tmp_path))
    assert (tmp_path / "s3:" / "x" / "config").is_file()
    assert (tmp_path / "gs:b" / "config").is_file()


def test_a_missing_sdk_is_named_with_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from cas.backends import open_backend
    from cas.errors import ConfigurationError

    monkeypatch.delitem(sys.modules, "cas.backends.azure", raising=False)
    monkeypatch.setitem(sys.modules, "requests", None)  # as if it were not installed
    with pytest.raises(ConfigurationError) as caught:
        open_backend("az://container/prefix")
    message = str(caught.value)
    assert "Azure SDK (azure-storage-blob)" in message
    assert "pip install 'cas-store[azure]'" in message


def test_argparse_errors_exit_2(env: tuple[Path, Path]) -> None:
    store, _ = env
    for args in (["put"], ["get", "k"], ["frobnicate"], ["ls", "--bogus"]):
        proc = run_cas(*args, store=store)
        assert proc.returncode == 2, args
        assert "usage:" in proc.stderr


# -- malicious manifests ---------------------------------------------------------------------


def plant(
    store_root: Path, key: str, entries: tuple[Entry, ...], kind: ArtifactKind = "directory"
) -> str:
    """Commit a hand-made manifest, as an attacker with write access to the store could."""
    store = cas.open(store_root, create=False)
    manifest = Manifest(key=key, kind=kind, created=utc_now(), entries=entries)
    blob = manifest.to_bytes()
    manifest_id = Digest.of(blob)
    store.backend.put(layout.manifest_key(manifest_id), blob)
    ref = store.refs.create_next(key, manifest_id)
    return f"{key}@{ref.number}"


def a_real_file_entry(store_root: Path, path: str) -> Entry:
    entry = next(e for e in cas.open(store_root).show("k@1").entries if e.path == "weights.bin")
    return Entry(path, "file", 0o644, entry.size, entry.digest, entry.chunks)


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("absolute", ["absolute"]),
        ("dotdot", [".."]),
        ("nested-dotdot", [".."]),
        ("link-up", ["outside"]),
        ("link-absolute", ["outside"]),
        ("link-deep-up", ["outside"]),
        ("below-link", ["below a symlink"]),
        ("file-kind-dotdot", [".."]),
        ("duplicate", ["twice"]),
    ],
)
def test_malicious_manifest_is_refused(
    env: tuple[Path, Path], tmp_path: Path, name: str, words: list[str]
) -> None:
    store, _ = env
    arena = tmp_path / "arena"
    (arena / "inside").mkdir(parents=True)
    victim = arena / "victim"
    dest = arena / "inside" / "dest"
    file_entry = a_real_file_entry
    entries = {
        "absolute": (file_entry(store, str(victim)),),
        "dotdot": (file_entry(store, "../victim"),),
        "nested-dotdot": (Entry("a", "dir", 0o755), file_entry(store, "a/../../../victim")),
        "link-up": (Entry("l", "symlink", 0o777, target="../../victim"),),
        "link-absolute": (Entry("l", "symlink", 0o777, target=str(victim)),),
        "link-deep-up": (
            Entry("a", "dir", 0o755),
            Entry("a/l", "symlink", 0o777, target="b/../../.."),
        ),
        "below-link": (
            Entry("up", "symlink", 0o777, target="."),
            file_entry(store, "up/x"),
        ),
        "file-kind-dotdot": (file_entry(store, "../victim"),),
        "duplicate": (file_entry(store, "a"), file_entry(store, "a")),
    }[name]
    ref = plant(store, "evil", entries, kind="file" if name == "file-kind-dotdot" else "directory")
    before = sorted(p.relative_to(arena).as_posix() for p in arena.rglob("*"))
    # --force, the riskier form: DEST would be replaced if it existed.
    proc = run_cas("get", ref, dest, "--force", store=store)
    assert_usage_error(proc, *words)
    assert not victim.exists()
    assert not os.path.lexists(dest)
    assert sorted(p.relative_to(arena).as_posix() for p in arena.rglob("*")) == before


def test_malicious_manifest_does_not_affect_honest_versions(
    env: tuple[Path, Path], tmp_path: Path
) -> None:
    store, tree = env
    plant(store, "k", (Entry("l", "symlink", 0o777, target="/etc"),))
    assert_usage_error(run_cas("get", "k", tmp_path / "evil", store=store), "outside")
    ok(run_cas("get", "k@1", tmp_path / "honest", store=store))
    assert snapshot(tmp_path / "honest") == snapshot(tree)
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("dest", [".", "..", "project"])
def test_forced_get_never_replaces_a_folder_holding_the_store(tmp_path: Path, dest: str) -> None:
    # `cas get KEY . --force` in a project that keeps its store in ./.cas (the
    # default) must not move the project, store included, aside and delete it.
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')\n")
    src = project / "model.bin"
    src.write_bytes(b"weights" * 1000)
    ok(run_cas("put", src, "m", cwd=project))
    assert (project / ".cas" / "config").is_file()
    if dest == "project":  # from outside, naming the store explicitly
        proc = run_cas("get", "m", dest, "--force", cwd=tmp_path, store=project / ".cas")
    else:
        proc = run_cas("get", "m", dest, "--force", cwd=project)
    assert_usage_error(proc, "store")
    assert (project / ".cas" / "config").is_file(), "the store was deleted"
    assert (project / "train.py").read_text() == "print('hi')\n"
    assert [v["ref"] for v in json_log(project)] == ["m@1"]


def json_log(cwd: Path) -> list[dict[str, Any]]:
    import json

    log: list[dict[str, Any]] = json.loads(ok(run_cas("log", "m", "--json", cwd=cwd)).stdout)
    return log


# -- the parser built for one command -------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["get", "k", "d"], "get"),
        (["--store", "s", "--json", "put", "p", "k"], "put"),
        (["--store=get", "--no-progress", "ls"], "ls"),
        (["--store", "put", "log", "k"], "log"),  # the store's name is not the command
        (["--sto", "s", "get", "k", "d"], None),  # abbreviations are argparse's to read
        (["--help"], None),
        ([], None),
    ],
)
def test_the_command_is_found_before_the_parser_is_built(
    argv: list[str], expected: str | None
) -> None:
    from cas.cli import requested_command

    assert requested_command(argv) == expected


def test_a_parser_built_for_one_command_parses_as_the_full_one() -> None:
    from cas.cli import build_parser

    argv = ["--store", "s", "put", "src", "k", "--tag", "a", "--metric", "loss=1", "-j", "3"]
    full = build_parser().parse_args(argv)
    one = build_parser("put").parse_args(argv)
    assert vars(one) == vars(full)
    with pytest.raises(SystemExit):
        build_parser("put").parse_args(["get", "k", "d"])  # built for put alone


def test_unknown_command_lists_every_command(tmp_path: Path) -> None:
    proc = run_cas("bogus", store=tmp_path / "s")
    assert_usage_error(proc, "invalid choice", "'put'", "'gc'", "'find'")
