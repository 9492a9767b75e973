"""scripts/update_doc_transcripts.py: what it replays, ignores and rewrites."""

from __future__ import annotations

from pathlib import Path

from helpers import load_script

transcripts = load_script("update_doc_transcripts")
STALE = """# A doc

<!-- transcript session /tmp/cas-x -->
<!-- transcript setup
$ printf 'twelve bytes' > f
-->
```console
$ cas init
initialised cas store at file:///tmp/cas-x/.cas (chunks 64.0 KiB / 256.0 KiB / 1.0 MiB)
$ cas put f k --json | grep -c manifest
1
$ cas stats
keys:              1
```
"""


def test_a_stale_output_is_reported_and_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "doc.md"
    path.write_text(STALE)
    diffs, lines = transcripts.check_doc(transcripts.read_doc(path))
    assert len(diffs) == 1
    assert "-initialised cas store at file:///tmp/cas-x/.cas (chunks 64.0 KiB" in diffs[0]
    assert "+initialised cas store at file:///tmp/cas-x/.cas (chunks 256.0 KiB" in diffs[0]
    assert "+versions:          1" in diffs[0]
    assert "$ cas put f k --json | grep -c manifest" in lines  # commands stay as written
    path.write_text("\n".join(lines))
    assert transcripts.check_doc(transcripts.read_doc(path)) == ([], lines)


def test_what_varies_between_runs_is_all_that_is_ignored() -> None:
    normalise, reconcile = transcripts.normalise, transcripts.reconcile
    a, b = "1" * 64, "2" * 64
    written = f'"created": "2026-11-21T19:21:50.286813Z",\n"manifest": "{a}"\nmanifest: {a}'
    run = f'"created": "2026-12-07T00:41:37.217480Z",\n"manifest": "{b}"\nmanifest: {b}'
    assert normalise(written) == normalise(run)
    # A manifest shown by a command of another run no longer names the same one.
    assert normalise(f"manifest: {a}\nmanifest: {a}") != normalise(f"manifest: {b}\nmanifest: {a}")
    # Chunk hashes, sizes and counts are compared as they are.
    assert normalise(f'"blake3": "{a}"') != normalise(f'"blake3": "{b}"')
    assert normalise("chunks:            9 (9 referenced)") != normalise(
        "chunks:            9 (8 referenced)"
    )
    # Byte counts that include manifests may move by a few bytes, no more.
    near, far = normalise('"stored_bytes": 5092557'), normalise('"stored_bytes": 5092555')
    assert reconcile(near, far) == near
    assert reconcile(near, normalise('"stored_bytes": 5093557')) != near
    shown = normalise("kept by grace: 2 objects, 1.2 KiB (unreferenced but recent)")
    assert (
        reconcile(shown, normalise("kept by grace: 2 objects, 1.3 KiB (unreferenced but recent)"))
        == shown
    )
    assert (
        reconcile(shown, normalise("kept by grace: 3 objects, 1.2 KiB (unreferenced but recent)"))
        != shown
    )
