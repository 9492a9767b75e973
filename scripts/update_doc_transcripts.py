"""Replay the command transcripts in docs/*.md, and rewrite the outputs that changed.

    python scripts/update_doc_transcripts.py             # rewrite the stale transcripts
    python scripts/update_doc_transcripts.py --check     # only report them (exit 1 if any)
    python scripts/update_doc_transcripts.py docs/cli.md # one doc

A doc opts in with HTML comments, which Markdown renderers do not show:

    <!-- transcript session /tmp/cas-demo CAS_STORE=/tmp/cas-demo/store -->

starts a session: every ```console block after it, up to the next session,
runs in order in a new empty directory that the doc calls /tmp/cas-demo,
with the variables given set.

    <!-- transcript setup
    $ python "$SOURCE_TREE"/scripts/doc_fixtures.py cli-session
    -->

runs commands before the next block without showing them (each must
succeed); ``$SOURCE_TREE`` is the repository. ``<!-- transcript skip -->``
leaves the next console block as written, unrun (an install that needs the
network, say).

In a console block, a line that starts with ``$ `` is a command and the
lines after it are what it printed, standard error and output as a terminal
shows them. ``cas ...`` runs in this process (``cas.cli.main``: the same
code as the ``cas`` command, at a fraction of its start-up), anything else
under bash, where ``python`` and ``cas`` are this interpreter's. A rewrite
puts each session's outputs back from one run, so every id in it agrees.

Outputs are compared after normalising what differs from run to run however
the inputs are chosen: times and durations, the store's random id, the ids
of manifests (they hold their creation time; each must still name the same
manifest everywhere in its session), and the owners and dates in ``ls -l``.
Everything else, chunk hashes, sizes, counts and ratios included, must
match: the inputs are made deterministically.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transcript_shell import ROOT, ReplayError, Shell

DOCS = ROOT / "docs"

SESSION = re.compile(r"<!-- transcript session (?P<args>.+?) -->\s*$")
SETUP = re.compile(r"<!-- transcript setup\s*$")
SKIP = re.compile(r"<!-- transcript skip -->\s*$")
FENCE = "```"
HEREDOC = re.compile(r"<<-?\s*'?(?P<word>\w+)'?\s*$")


@dataclass
class Command:
    text: str
    output: list[str] = field(default_factory=list)


@dataclass
class Block:
    """A ```console block: ``lines[begin:end]`` of its doc, between the fences."""

    begin: int
    end: int
    commands: list[Command]
    setup: list[str]
    skip: bool


@dataclass
class Session:
    directory: str
    env: dict[str, str]
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Doc:
    path: Path
    lines: list[str]
    sessions: list[Session]
    #: Console blocks with a cas command that no session replays and none skips.
    unreplayed: list[int]


# -- reading a doc ----------------------------------------------------------------------


def parse_commands(lines: list[str], where: str) -> list[Command]:
    """The commands of a block (or a setup comment) and the output lines after each."""
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.startswith("$ "):
            if not commands:
                raise ReplayError(f"{where}: output before any command: {line!r}")
            commands[-1].output.append(line)
            continue
        text = line[2:]
        heredoc = HEREDOC.search(text)
        if heredoc:  # the lines up to the end word are part of the command
            end = lines.index(heredoc["word"], i)
            text = "\n".join([text, *lines[i : end + 1]])
            i = end + 1
        commands.append(Command(text))
    return commands


def parse_session(args: str, where: str) -> Session:
    directory, *assignments = shlex.split(args)
    if not directory.startswith("/"):
        raise ReplayError(f"{where}: a session's directory must be absolute: {directory!r}")
    env = {}
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep:
            raise ReplayError(f"{where}: expected NAME=VALUE, not {item!r}")
        env[name] = value
    return Session(directory, env)


def read_doc(path: Path) -> Doc:
    lines = path.read_text(encoding="utf-8").split("\n")
    doc = Doc(path, lines, [], [])
    setup: list[str] = []
    skip = False
    i = 0
    while i < len(lines):
        line, where = lines[i], f"{path.name}:{i + 1}"
        if match := SESSION.match(line):
            doc.sessions.append(parse_session(match["args"], where))
        elif SETUP.match(line):
            end = lines.index("-->", i)
            setup += [c.text for c in parse_commands(lines[i + 1 : end], where)]
            i = end
        elif SKIP.match(line):
            skip = True
        elif line.startswith(FENCE + "console"):
            end = lines.index(FENCE, i + 1)
            block = Block(i + 1, end, parse_commands(lines[i + 1 : end], where), setup, skip)
            if doc.sessions:
                doc.sessions[-1].blocks.append(block)
            elif not skip and any(c.text.startswith("cas ") for c in block.commands):
                doc.unreplayed.append(i + 1)
            setup, skip = [], False
            i = end
        i += 1
    return doc


# -- replaying and comparing ------------------------------------------------------------


def replay(session: Session) -> list[list[list[str]]]:
    """What each command of each block printed: [block][command] -> lines."""
    with tempfile.TemporaryDirectory(prefix="cas-transcript-") as scratch:
        shell = Shell(session.directory, session.env, Path(scratch))
        results = []
        for block in session.blocks:
            for text in block.setup:
                output = shell.run(text)
                if shell.status != 0:
                    raise ReplayError(f"setup command failed ({shell.status}): {text}\n{output}")
            if block.skip:
                results.append([c.output for c in block.commands])
                continue
            results.append([lines(shell.run(c.text)) for c in block.commands])
        return results


def lines(output: str) -> list[str]:
    return (
        output[:-1].split("\n") if output.endswith("\n") else output.split("\n") if output else []
    )


# What differs between runs of the same commands on the same inputs.
VARYING = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"), "<time>"),  # RFC 3339
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"), "<time>"),  # cas log, cas find
    (re.compile(r"\d{8}T\d{6,12}Z"), "<time>"),  # quarantined chunks' suffix
    (re.compile(r'("(?:started|threshold|seconds)": )[0-9.e+-]+'), r"\1<number>"),
    (re.compile(r"^(took: +)\S+"), r"\1<duration>"),
    (re.compile(r'("id": ?")[0-9a-f]{32}"'), r'\1<store id>"'),
    # ls -l: keep the mode, size and name; owners, dates and the block total vary.
    (
        re.compile(r"^([-dl][rwxsStT-]{9}\S?) +\d+ +\S+ +\S+ +(\d+) +\w+ +\d+ +[\d:]+ (.*)$"),
        r"\1 \2 \3",
    ),
    (re.compile(r"^total \d+$"), "total <blocks>"),
    # Notes of the catalog's log end in a random suffix.
    (re.compile(r"(catalog/log/\S*)\.[0-9a-f]{16}$"), r"\1.<nonce>"),
]
# Where manifest ids appear: as values first (numbered in the order the session
# shows them; "manifest <id>" is how error messages name one), then as object
# names, whose listings are in the ids' random order (so consecutive lines of
# them are compared sorted).
MANIFEST_ID = re.compile(r'(?:"manifest": ?"|manifest: +|manifest )([0-9a-f]{64})')
MANIFEST_OBJECT = re.compile(r"manifests/[0-9a-f]{2}/([0-9a-f]{64})")
LISTED_MANIFEST = re.compile(r"manifests/<manifest \d+>")


# Byte counts that include manifests, whose compressed size moves by a byte or
# two with the times and parent ids in them: compared within MANIFEST_SLACK
# bytes (and within the rounding of a size like "1.2 KiB").
MANIFEST_SLACK = 64
SIZE = r"\d+(?:\.\d)? (?:B|KiB|MiB|GiB|TiB)"
WITH_MANIFESTS = [
    re.compile(
        r'"(?:stored_bytes|live_bytes|version_bytes|reachable_bytes|bytes_reclaimed|'
        r'bytes_kept_by_grace|reclaimable_stored_bytes)": (?P<n>\d+)'
    ),
    re.compile(rf"^  own chunks: +(?P<s>{SIZE}) \("),
    re.compile(rf"^stored bytes: +(?P<s>{SIZE}) \((?P<s2>{SIZE}) needed by live versions\)"),
    re.compile(rf"^reachable: +\d+ objects, (?P<s>{SIZE})$"),
    re.compile(rf"^(?:deleted|would delete): .*\), (?P<s>{SIZE}) reclaim"),
    re.compile(rf"^kept by grace: \d+ objects, (?P<s>{SIZE}) \("),
    re.compile(rf"\d+ chunks, (?P<s>{SIZE}) stored\)"),
]
APPROXIMATE = re.compile(r"<≈(\d+)~(\d+)>")
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def approximate(line: str) -> str:
    """``line`` with its byte counts that include manifests as ``<≈BYTES~SLACK>``."""
    for pattern in WITH_MANIFESTS:
        match = pattern.search(line)
        if not match:
            continue
        for name, text in sorted(match.groupdict().items(), key=lambda i: -match.start(i[0])):
            if text is None:
                continue
            if name == "n":
                value, slack = int(text), MANIFEST_SLACK
            else:
                number, unit = text.split()
                step = UNITS[unit] if unit == "B" else UNITS[unit] // 10
                value, slack = round(float(number) * UNITS[unit]), step + MANIFEST_SLACK
            line = f"{line[: match.start(name)]}<≈{value}~{slack}>{line[match.end(name) :]}"
    return line


def reconcile(old: str, new: str) -> str:
    """``new`` with each line that differs from ``old`` only in approximate byte counts,
    each within its slack, taken as ``old``'s."""
    old_lines, new_lines = old.split("\n"), new.split("\n")
    if len(old_lines) != len(new_lines):
        return new
    out = []
    for was, now in zip(old_lines, new_lines, strict=True):
        if was != now and APPROXIMATE.sub("<≈>", was) == APPROXIMATE.sub("<≈>", now):
            pairs = zip(APPROXIMATE.findall(was), APPROXIMATE.findall(now), strict=True)
            if all(abs(int(a) - int(b)) <= max(int(s), int(t)) for (a, s), (b, t) in pairs):
                now = was
        out.append(now)
    return "\n".join(out)


def normalise(text: str) -> str:
    """``text`` with what varies between runs replaced; manifest ids numbered in order."""
    out = []
    for line in text.split("\n"):
        for pattern, replacement in VARYING:
            line = pattern.sub(replacement, line)
        out.append(approximate(line))
    text = "\n".join(out)
    ids: dict[str, str] = {}
    for pattern in (MANIFEST_ID, MANIFEST_OBJECT):
        for match in pattern.finditer(text):
            ids.setdefault(match[1], f"<manifest {len(ids) + 1}>")
    for manifest_id, name in ids.items():
        text = text.replace(f"{manifest_id[:2]}/{manifest_id}", name).replace(manifest_id, name)
    return "\n".join(_sorted_listings(text.split("\n")))


def _sorted_listings(lines: list[str]) -> list[str]:
    """``lines`` with each run of consecutive lines that name manifest objects sorted."""
    out: list[str] = []
    run: list[str] = []
    for line in [*lines, ""]:
        if LISTED_MANIFEST.search(line):
            run.append(line)
            continue
        out += sorted(run)
        run = []
        out.append(line)
    return out[:-1]


def render(block: Block, outputs: list[list[str]]) -> list[str]:
    out = []
    for command, output in zip(block.commands, outputs, strict=True):
        out.append("$ " + command.text)
        out += output
    return out


def compare(doc: Doc, session: Session, actual: list[list[list[str]]]) -> str:
    """A unified diff of the session's normalised transcripts, or "" if they agree."""
    expected = [render(b, [c.output for c in b.commands]) for b in session.blocks]
    got = [render(b, outputs) for b, outputs in zip(session.blocks, actual, strict=True)]
    old = normalise(
        "\n".join(
            f"@@ line {b.begin + 1}\n" + "\n".join(x)
            for b, x in zip(session.blocks, expected, strict=True)
        )
    )
    new = normalise(
        "\n".join(
            f"@@ line {b.begin + 1}\n" + "\n".join(x)
            for b, x in zip(session.blocks, got, strict=True)
        )
    )
    new = reconcile(old, new)
    if old == new:
        return ""
    name = doc.path.relative_to(ROOT) if doc.path.is_relative_to(ROOT) else doc.path
    diff = difflib.unified_diff(
        old.split("\n"), new.split("\n"), f"{name} (as written)", f"{name} (as run)", lineterm=""
    )
    return "\n".join(diff)


def check_doc(doc: Doc) -> tuple[list[str], list[str]]:
    """(the diffs of the stale sessions, the doc's lines with their outputs from this run)."""
    diffs, new_lines = [], list(doc.lines)
    # Blocks are rewritten from the last up, so the line numbers of earlier ones hold.
    rewrites: list[tuple[Block, list[str]]] = []
    for session in doc.sessions:
        actual = replay(session)
        diff = compare(doc, session, actual)
        if diff:
            diffs.append(diff)
            rewrites += [(b, render(b, o)) for b, o in zip(session.blocks, actual, strict=True)]
    for block, text in sorted(rewrites, key=lambda r: r[0].begin, reverse=True):
        if not block.skip:
            new_lines[block.begin : block.end] = text
    return diffs, new_lines


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("docs", nargs="*", type=Path, help="default: every docs/*.md")
    parser.add_argument("--check", action="store_true", help="report stale transcripts only")
    args = parser.parse_args()
    stale = 0
    for path in args.docs or sorted(DOCS.glob("*.md")):
        doc = read_doc(path.resolve())
        for line in doc.unreplayed:
            print(f"{path}:{line}: a console block with cas commands that no session replays")
            stale += 1
        diffs, new_lines = check_doc(doc)
        for diff in diffs:
            print(diff)
        if diffs and not args.check:
            path.write_text("\n".join(new_lines), encoding="utf-8")
            print(f"rewrote {path}")
        stale += len(diffs)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
