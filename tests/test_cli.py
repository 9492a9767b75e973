"""The cas command line, run as a subprocess: every core command, human and --json output."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    CAS_SCRIPT,
    PYTHON,
    build_sample_tree,
    ok,
    random_bytes,
    run_cas,
    run_json,
    small_store,
    snapshot,
    temp_leftovers,
)

import cas

HEX64 = re.compile(r"[0-9a-f]{64}")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return build_sample_tree(tmp_path / "tree")


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    small_store(root)
    return root


def put(store: Path, src: Path, key: str, **kwargs: Any) -> None:
    """Set-up through the library, to keep the subprocess calls for what is under test."""
    cas.open(store, create=False).put(src, key, **kwargs)


# -- entry points and store selection ------------------------------------------------


def test_python_m_cas_and_the_script() -> None:
    for command in ([PYTHON, "-m", "cas"], [str(CAS_SCRIPT)]):
        proc = ok(run_cas("--version", command=command))
        assert proc.stdout.strip() == f"cas {cas.__version__}"
        helptext = ok(run_cas("--help", command=command)).stdout
        for name in ("init", "put", "get", "ls", "log", "show", "tag", "rm", "stats", "verify"):
            assert re.search(rf"^\s+{name}\s", helptext, re.MULTILINE), name


def test_no_command_is_a_usage_error() -> None:
    proc = run_cas()
    assert proc.returncode == 2
    assert "usage:" in proc.stderr


def test_store_option_env_and_default_location(tmp_path: Path, tree: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # Default: ./.cas in the working directory, created on first use.
    ok(run_cas("put", tree, "k", cwd=cwd))
    assert (cwd / ".cas" / "config").is_file()
    # $CAS_STORE.
    env_store = tmp_path / "env-store"
    ok(run_cas("put", tree, "k", cwd=cwd, env={"CAS_STORE": str(env_store)}))
    assert (env_store / "config").is_file()
    # --store, before or after the command, wins over $CAS_STORE.
    opt_store = tmp_path / "opt-store"
    ok(run_cas("--store", opt_store, "put", tree, "k", cwd=cwd, env={"CAS_STORE": "x"}))
    ok(run_cas("put", tree, "k", "--store", opt_store, cwd=cwd, env={"CAS_STORE": "x"}))
    assert not (cwd / "x").exists()
    # Each store holds exactly the versions put to it.
    assert [v["version"] for v in run_json("log", "k", cwd=cwd)] == [1]
    assert [v["version"] for v in run_json("log", "k", store=env_store)] == [1]
    assert [v["version"] for v in run_json("log", "k", store=opt_store)] == [2, 1]
    from_env = run_json("log", "k", cwd=cwd, env={"CAS_STORE": str(opt_store)})
    assert [v["version"] for v in from_env] == [2, 1]
    # file:// URIs name the same folder.
    assert [v["version"] for v in run_json("log", "k", store=opt_store.as_uri())] == [2, 1]


def test_read_commands_do_not_create_a_store(tmp_path: Path) -> None:
    for args in (["ls"], ["log", "k"], ["stats"], ["verify"], ["get", "k", "out"]):
        proc = run_cas(*args, cwd=tmp_path)
        assert proc.returncode == 2, args
        assert "not a cas store" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- init ----------------------------------------------------------------------------------


def test_init_human_and_json(tmp_path: Path) -> None:
    proc = ok(run_cas("init", "--chunk-avg", "64K", store=tmp_path / "a"))
    assert "initialised cas store" in proc.stdout
    assert "64.0 KiB" in proc.stdout
    data = run_json("init", "--chunk-avg", "1MiB", store=tmp_path / "b")
    assert data["store"] == (tmp_path / "b").as_uri()
    assert data["config"]["chunker"] == {
        "algorithm": "fastcdc",
        "min_size": 256 * 1024,
        "avg_size": 1024 * 1024,
        "max_size": 4 * 1024 * 1024,
    }
    assert data["config"]["format"] == 4  # scaled difference deltas, the default
    assert "format 4" in proc.stdout
    stored = json.loads((tmp_path / "a" / "config").read_text())
    assert stored["chunker"]["avg_size"] == 64 * 1024
    # Twice is an error, and the first config stays.
    proc = run_cas("init", store=tmp_path / "a")
    assert proc.returncode == 2
    assert "already a cas store" in proc.stderr
    assert json.loads((tmp_path / "a" / "config").read_text()) == stored


# -- put / get ------------------------------------------------------------------------------


def test_put_with_everything_human_and_json(store: Path, tree: Path) -> None:
    proc = ok(run_cas("put", tree, "runs/bert", store=store))
    assert proc.stdout.strip() == "runs/bert@1"
    v = run_json(
        "put", tree, "runs/bert",
        "--parent", "runs/bert@1",
        "--tag", "best", "--tag", "prod",
        "--metric", "loss=0.25", "--metric", "step=1000", "--metric", "lr=1e-4",
        "--meta", "model=bert-base", "--meta", "layers=12", "--meta", 'cfg={"drop": 0.1}',
        "--meta", "flag=true",
        "--message", "second run",
        store=store,
    )  # fmt: skip
    assert v["ref"] == "runs/bert@2"
    assert v["key"] == "runs/bert"
    assert v["version"] == 2
    assert HEX64.fullmatch(v["manifest"])
    assert v["kind"] == "directory"
    assert v["files"] == 5
    assert v["parents"] == ["runs/bert@1"]
    assert v["tags"] == ["best", "prod"]
    assert v["metrics"] == {"loss": 0.25, "step": 1000, "lr": 1e-4}
    assert isinstance(v["metrics"]["step"], int)
    assert v["metadata"] == {"model": "bert-base", "layers": 12, "cfg": {"drop": 0.1},
                             "flag": True}  # fmt: skip
    assert v["message"] == "second run"
    # -m is --message.
    assert run_json("put", tree, "runs/bert", "-m", "short", store=store)["message"] == "short"


def test_get_every_ref_form_and_force(store: Path, tree: Path, tmp_path: Path) -> None:
    put(store, tree, "k", tags=["first"])
    v1 = snapshot(tree)
    (tree / "weights.bin").write_bytes(random_bytes(70_000, 5))
    (tree / "new-file").write_text("new")
    put(store, tree, "k")
    v2 = snapshot(tree)
    assert v1 != v2

    out = tmp_path / "out"
    cases = {"k": v2, "k@1": v1, "k@2": v2, "k:first": v1}
    for i, (ref, expected) in enumerate(cases.items()):
        dest = out / f"d{i}"
        proc = ok(run_cas("get", ref, dest, store=store))
        assert "verified" in proc.stdout
        assert snapshot(dest) == expected, ref
    # --json
    data = run_json("get", "k@1", out / "j", store=store)
    assert data["ref"] == "k@1"
    assert data["dest"] == str(out / "j")
    assert snapshot(out / "j") == v1
    # DEST exists: refused, then replaced with --force.
    proc = run_cas("get", "k@2", out / "j", store=store)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr
    assert "--force" in proc.stderr
    assert snapshot(out / "j") == v1
    ok(run_cas("get", "k@2", out / "j", "--force", store=store))
    assert snapshot(out / "j") == v2
    assert temp_leftovers(out) == []


def test_put_and_get_a_single_file(store: Path, tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(random_bytes(300_000, 9))
    src.chmod(0o600)
    v = run_json("put", src, "models/m", store=store)
    assert (v["kind"], v["files"], v["size"]) == ("file", 1, 300_000)
    dest = tmp_path / "restored.bin"
    ok(run_cas("get", "models/m", dest, store=store))
    assert snapshot(dest) == snapshot(src)


def test_a_put_that_changes_the_kind_of_a_key_warns(
    store: Path, tree: Path, tmp_path: Path
) -> None:
    single = tmp_path / "model.bin"
    single.write_bytes(b"weights")
    first = run_cas("put", tree, "k", store=store)
    assert first.stderr == ""
    proc = ok(run_cas("put", single, "k", store=store))
    assert proc.stdout.strip() == "k@2"
    assert "cas: warning: k@2 is a single file, where k@1 was a folder" in proc.stderr
    back = run_cas("--json", "put", tree, "k", store=store)
    assert json.loads(back.stdout)["warnings"] == [
        "k@3 is a folder, where k@2 was a single file; a get of k now writes a folder"
    ]
    same = run_cas("--json", "put", tree, "k", store=store)
    assert (json.loads(same.stdout)["warnings"], same.stderr) == ([], "")
    lines = ok(run_cas("log", "k", store=store)).stdout.splitlines()
    assert [line.split()[5] for line in lines] == ["directory", "directory", "file", "directory"]


def test_the_library_warns_of_a_kind_change(tmp_path: Path, tree: Path) -> None:
    from cas.errors import KindChangeWarning

    store = small_store(tmp_path / "lib")
    single = tmp_path / "model.bin"
    single.write_bytes(b"weights")
    store.put(single, "k")
    with pytest.warns(KindChangeWarning, match="k@2 is a folder, where k@1 was a single file"):
        store.put(tree, "k")


# -- listing and inspection --------------------------------------------------------------


def test_ls(store: Path, tree: Path) -> None:
    for key in ("runs/a", "runs/b", "other", "runs/a"):
        put(store, tree, key)
    lines = ok(run_cas("ls", store=store)).stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["other", "runs/a", "runs/b"]
    assert "2 versions" in lines[1]
    assert "latest @2" in lines[1]
    rows = run_json("ls", store=store)
    assert [(r["key"], r["versions"], r["latest"]["version"]) for r in rows] == [
        ("other", 1, 1),
        ("runs/a", 2, 2),
        ("runs/b", 1, 1),
    ]
    assert [r["key"] for r in run_json("ls", "runs/", store=store)] == ["runs/a", "runs/b"]
    assert run_json("ls", "nothing", store=store) == []


def test_log(store: Path, tree: Path) -> None:
    put(store, tree, "k", tags=["best"], metrics={"loss": 0.5}, message="one")
    put(store, tree, "k", parents=["k@1"])
    lines = ok(run_cas("log", "k", store=store)).stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["k@2", "k@1"]
    assert "tags: best" in lines[1]
    assert "loss=0.5" in lines[1]
    assert "one" in lines[1]
    versions = run_json("log", "k", store=store)
    assert [v["ref"] for v in versions] == ["k@2", "k@1"]
    assert versions[0]["parents"] == ["k@1"]
    assert versions[1]["tags"] == ["best"]
    assert versions[1]["metrics"] == {"loss": 0.5}
    # The global option also works before the command.
    assert (
        ok(run_cas("--json", "log", "k", store=store)).stdout
        == ok(run_cas("log", "k", "--json", store=store)).stdout
    )


def test_show(store: Path, tree: Path) -> None:
    put(store, tree, "k", tags=["t"], metrics={"acc": 0.9}, metadata={"a": 1}, message="hello")
    text = ok(run_cas("show", "k@1", store=store)).stdout
    assert "ref:      k@1" in text
    assert re.search(r"manifest: [0-9a-f]{64}", text)
    assert "tags:     t" in text
    assert "acc=0.9" in text
    assert "message:  hello" in text
    assert "latest -> weights.bin" in text
    assert re.search(r"^\s+755\s.*run\.sh$", text, re.MULTILINE)
    assert re.search(r"empty-dir/$", text, re.MULTILINE)

    data = run_json("show", "k:t", store=store)
    assert data["ref"] == "k@1"
    entries = {e["path"]: e for e in data["entries"]}
    assert entries["latest"]["type"] == "symlink"
    assert entries["latest"]["target"] == "weights.bin"
    assert "blake3" not in entries["latest"]
    assert entries["run.sh"]["mode"] == "0o755"
    assert entries["sub/notes.txt"]["mode"] == "0o600"
    assert entries["empty-dir"]["type"] == "dir"
    assert entries["weights.bin"]["size"] == (tree / "weights.bin").stat().st_size
    assert entries["weights.bin"]["chunks"] >= 1
    assert HEX64.fullmatch(entries["weights.bin"]["blake3"])


def test_tag_and_untag(store: Path, tree: Path, tmp_path: Path) -> None:
    put(store, tree, "k")
    put(store, tree, "k")
    assert ok(run_cas("tag", "k@1", "best", store=store)).stdout.strip() == "k:best -> k@1"
    data = run_json("tag", "k", "prod", store=store)
    assert data["ref"] == "k@2"
    assert data["tags"] == ["prod"]
    assert run_json("show", "k:best", store=store)["version"] == 1
    # Moving a tag.
    ok(run_cas("tag", "k@2", "best", store=store))
    assert run_json("show", "k:best", store=store)["version"] == 2
    assert run_json("log", "k", store=store)[1]["tags"] == []
    # --delete.
    proc = ok(run_cas("tag", "k", "best", "--delete", store=store))
    assert "removed tag k:best" in proc.stdout
    assert run_json("tag", "k", "prod", "--delete", store=store) == {
        "key": "k", "tag": "prod", "deleted": True,
    }  # fmt: skip
    proc = run_cas("get", "k:best", tmp_path / "x", store=store)
    assert proc.returncode == 2
    assert "k:best" in proc.stderr
    assert run_json("log", "k", store=store)[0]["tags"] == []


def test_rm(store: Path, tree: Path) -> None:
    put(store, tree, "k", tags=["keep"])
    for _ in range(3):
        put(store, tree, "k")
    proc = ok(run_cas("rm", "k@4", store=store))
    assert "deleted k@4" in proc.stdout
    assert "gc" in proc.stdout
    assert run_json("rm", "k@3", store=store) == ["k@3"]
    # A tagged version needs --force.
    proc = run_cas("rm", "k:keep", store=store)
    assert proc.returncode == 2
    assert "tagged" in proc.stderr
    assert "--force" in proc.stderr
    assert [v["version"] for v in run_json("log", "k", store=store)] == [2, 1]
    # --all needs --force too when something is tagged.
    proc = run_cas("rm", "k", "--all", store=store)
    assert proc.returncode == 2
    assert "tagged" in proc.stderr
    assert sorted(run_json("rm", "k", "--all", "--force", store=store)) == ["k@1", "k@2"]
    proc = run_cas("log", "k", store=store)
    assert proc.returncode == 2
    # Numbers are not reused.
    assert run_json("put", tree, "k", store=store)["version"] == 5


def test_rm_single_tagged_with_force(store: Path, tree: Path) -> None:
    put(store, tree, "k", tags=["a", "b"])
    put(store, tree, "k")
    assert run_json("rm", "k:a", "--force", store=store) == ["k@1"]
    for tag in ("a", "b"):
        assert run_cas("show", f"k:{tag}", store=store).returncode == 2
    assert [v["version"] for v in run_json("log", "k", store=store)] == [2]


def test_stats(store: Path, tree: Path) -> None:
    put(store, tree, "a")
    put(store, tree, "b")
    text = ok(run_cas("stats", store=store)).stdout
    assert re.search(r"^keys:\s+2$", text, re.MULTILINE)
    assert re.search(r"^versions:\s+2$", text, re.MULTILINE)
    assert re.search(r"^dedup ratio:\s+2\.00x$", text, re.MULTILINE)
    data = run_json("stats", store=store)
    assert (data["keys"], data["versions"]) == (2, 2)
    assert data["logical_bytes"] == 2 * data["unique_bytes"]
    assert data["dedup_ratio"] == 2.0
    assert data["chunks"] == data["referenced_chunks"] > 0
    assert data["stored_bytes"] > 0


def test_verify_human_and_json(store: Path, tree: Path) -> None:
    put(store, tree, "a")
    put(store, tree, "a")
    text = ok(run_cas("verify", store=store)).stdout
    assert "checked 2 versions" in text
    assert text.strip().endswith("ok")
    deep = ok(run_cas("verify", "--deep", store=store)).stdout
    assert "read and rehashed" in deep
    data = run_json("verify", "--deep", store=store)
    assert data["ok"] is True
    assert data["deep"] is True
    assert data["versions"] == 2
    assert data["chunks_read"] == data["chunks_referenced"] > 0
    assert data["damaged"] == []
    shallow = run_json("verify", store=store)
    assert (shallow["ok"], shallow["deep"], shallow["chunks_read"]) == (True, False, 0)


ONE_PLURAL = re.compile(r"\b1 (files|versions|objects|chunks|manifests)\b")


def test_counts_of_one_are_singular(store: Path, tmp_path: Path) -> None:
    src = tmp_path / "small.txt"
    src.write_text("one chunk")
    put(store, src, "k")
    put(store, src, "gone")
    cas.open(store, create=False).delete("gone@1")
    texts = [
        ok(run_cas("show", "k", store=store)).stdout,
        ok(run_cas("verify", store=store)).stdout,
        ok(run_cas("gc", "--grace", "0", store=store)).stdout,
    ]
    assert "1 file," in texts[0]
    assert "checked 1 version, 1 chunk" in texts[1]
    assert re.search(r"^deleted:\s+1 object \(0 chunks, 1 manifest\)", texts[2], re.MULTILINE)
    for text in texts:
        assert not ONE_PLURAL.search(text), text


def test_counted() -> None:
    from cas.units import counted

    assert [counted(n, "file") for n in (0, 1, 2)] == ["0 files", "1 file", "2 files"]
    assert counted(2, "entry", "entries") == "2 entries"


def test_empty_store_commands(store: Path) -> None:
    assert ok(run_cas("ls", store=store)).stdout.strip() == ""
    assert run_json("ls", store=store) == []
    assert run_json("stats", store=store)["versions"] == 0
    assert run_json("verify", store=store)["ok"] is True


def test_progress_flag_and_quiet_stderr(store: Path, tree: Path, tmp_path: Path) -> None:
    # Not a terminal: no progress bar noise on stderr, with or without --no-progress.
    for extra in ([], ["--no-progress"]):
        proc = ok(run_cas("put", tree, "k", *extra, store=store))
        assert proc.stderr == ""
        proc = ok(run_cas("get", "k", tmp_path / f"o{len(extra)}", *extra, store=store))
        assert proc.stderr == ""


def test_get_of_a_tree_with_more_files_than_open_file_limit(store: Path, tmp_path: Path) -> None:
    # Datasets are often thousands of shards; a restore must not hold one open file
    # per file of the tree (the usual limit is 1024; here it is lowered to 128).
    import resource
    import subprocess

    from helpers import CAS, cas_env

    src = tmp_path / "shards"
    src.mkdir()
    for i in range(400):
        (src / f"shard-{i:04d}.txt").write_text(f"shard {i}\n" * (i % 7 + 1))
    put(store, src, "data/shards")

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    dest = tmp_path / "restored"
    proc = subprocess.run(
        [*CAS, "--store", str(store), "get", "data/shards", str(dest)],
        env=cas_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_files,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert snapshot(dest) == snapshot(src)
