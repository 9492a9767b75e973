"""The command transcripts in docs/ are what the commands print today.

Each doc's sessions are replayed by scripts/update_doc_transcripts.py, which
also rewrites them: a failure here means running that script and reading
the diff it makes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ROOT, load_script

transcripts = load_script("update_doc_transcripts")
DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_every_transcript_shows_what_its_commands_print(path: Path) -> None:
    doc = transcripts.read_doc(path)
    assert not doc.unreplayed, (
        f"console blocks with cas commands at lines {doc.unreplayed} of {path.name} are in no "
        "transcript session (see scripts/update_doc_transcripts.py)"
    )
    diffs, _ = transcripts.check_doc(doc)
    assert not diffs, "\n".join(diffs) + "\n\nrun: python scripts/update_doc_transcripts.py"


def test_the_docs_replay_the_commands_they_show() -> None:
    replayed = {p.name for p in DOCS if transcripts.read_doc(p).sessions}
    assert {"cli.md", "quickstart.md", "concepts.md", "workflow.md", "format.md"} <= replayed


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
