"""How scripts/update_doc_transcripts.py runs the commands of a transcript.

A session's commands share a directory, variables and the last exit
status, as in one terminal. ``cas`` and ``python`` run in this process, as
the same code would in their own (a fraction of a second saved on each
start-up); anything else, and anything with pipes past the first,
expansions other than ``$NAME``, globs or redirections, runs under bash.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Characters that ask for a shell when they are not quoted.
SHELL_SYNTAX = set("$`*?[]~;&<>(){}\\")


class ReplayError(Exception):
    """A transcript could not be replayed (a setup command failed, a bad directive)."""


VARIABLE = re.compile(r"\$(?:\{(\w+)\}|([A-Za-z_]\w*))")


def scan(text: str, env: dict[str, str]) -> tuple[str, str | None] | None:
    """Split ``text`` at its first unquoted ``|``, with ``$NAME`` expanded from ``env``
    outside single quotes: (before, after or None). None when the part before
    needs a shell: other expansions, globs, redirections, lists."""
    out, quote, i = [], "", 0
    while i < len(text):
        char = text[i]
        if char == "$" and quote != "'" and (match := VARIABLE.match(text, i)):
            name = match[1] or match[2]
            if name not in env:
                return None
            out.append(env[name])
            i = match.end()
            continue
        if quote:
            if char == quote:
                quote = ""
            elif quote == '"' and char in "$`\\":
                return None
        elif char in "'\"":
            quote = char
        elif char == "|":
            return "".join(out), text[i + 1 :]
        elif char in SHELL_SYNTAX:
            return None
        out.append(char)
        i += 1
    return "".join(out), None


class _Stream(io.TextIOBase):
    """A captured standard stream that also writes into the terminal's view of both."""

    def __init__(self, merged: list[str]) -> None:
        self.own: list[str] = []
        self.merged = merged

    def write(self, text: str) -> int:
        self.own.append(text)
        self.merged.append(text)
        return len(text)

    def isatty(self) -> bool:
        return False


@dataclass
class Result:
    status: int
    merged: str  # standard error and output, in the order they were written
    out: str
    err: str


@contextlib.contextmanager
def environment(cwd: Path, env: dict[str, str], argv: list[str]) -> Iterator[None]:
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def in_process(
    run: Callable[[], int | None], cwd: Path, env: dict[str, str], argv: list[str]
) -> Result:
    """Run ``run`` as a program would run: in ``cwd``, with ``env`` and ``argv``, its
    standard streams captured, its exit status from its return or SystemExit."""
    merged: list[str] = []
    out, err = _Stream(merged), _Stream(merged)
    with (
        environment(cwd, env, argv),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            status = run() or 0
        except SystemExit as stop:  # argparse's --help and usage errors, sys.exit
            code = stop.code
            status = code if isinstance(code, int) else 0 if code is None else 1
            if isinstance(code, str):
                print(code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            status = 1
    return Result(status, "".join(merged), "".join(out.own), "".join(err.own))


def python_program(argv: list[str]) -> Callable[[], None] | None:
    """What ``python ARGV`` runs, for ``-c CODE`` and ``SCRIPT.py``; None for the rest."""
    if len(argv) >= 2 and argv[0] == "-c":
        code = compile(argv[1], "<string>", "exec")
        return lambda: exec(code, {"__name__": "__main__"})
    if argv and argv[0].endswith(".py"):
        script = argv[0]

        def run_script() -> None:
            sys.path.insert(0, str(Path(script).resolve().parent))
            try:
                runpy.run_path(script, run_name="__main__")
            finally:
                sys.path.pop(0)

        return run_script
    return None


class Shell:
    """One session's directory, working directory, variables and last exit status.

    ``directory`` is the one the doc names; the session runs in a directory
    of that name in ``scratch``, and outputs show the doc's name for it.
    """

    def __init__(self, directory: str, env: dict[str, str], scratch: Path) -> None:
        self.doc_dir = directory
        self.real_dir = scratch / Path(directory).name
        self.real_dir.mkdir()
        self.cwd = self.real_dir
        self.status = 0
        bin_dir = scratch / "bin"
        bin_dir.mkdir()
        # Scripts, not links: a link to a virtual environment's python, outside
        # that environment, would start the interpreter without its packages.
        for name, command in (("python", ""), ("cas", " -m cas")):
            (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{command} "$@"\n')
            (bin_dir / name).chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if k != "CAS_STORE"}
        self.env.update(
            PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            SOURCE_TREE=str(ROOT),
            PYTHONUNBUFFERED="1",
        )
        self.env.update({k: self.to_real(v) for k, v in env.items()})

    def to_real(self, text: str) -> str:
        return text.replace(self.doc_dir, str(self.real_dir))

    def to_doc(self, text: str) -> str:
        for real in {os.path.realpath(self.real_dir), str(self.real_dir)}:
            text = text.replace(real, self.doc_dir)
        return text

    def run(self, text: str) -> str:
        """Run one command; returns what it printed, as the doc shows it."""
        text = self.to_real(text)
        split = scan(text, self.env) if "\n" not in text else None
        if split is None:
            return self.to_doc(self.bash(text))
        head, tail = split
        argv = shlex.split(head)
        env = dict(self.env)
        while argv and re.fullmatch(r"[A-Za-z_]\w*=.*", argv[0]):
            name, _, value = argv.pop(0).partition("=")
            env[name] = value
        if argv[:1] == ["cd"] and len(argv) == 2 and tail is None:
            target = (self.cwd / argv[1]).resolve()
            if not target.is_dir():
                raise ReplayError(f"cd {argv[1]}: no such directory")
            self.cwd, self.status = target, 0
            return ""
        if argv[:1] == ["cas"]:
            from cas.cli import main

            result = in_process(lambda: main(argv[1:]), self.cwd, env, argv)
        elif argv[:1] == ["python"] and (program := python_program(argv[1:])):
            result = in_process(program, self.cwd, env, argv[1:])
        else:
            return self.to_doc(self.bash(text))
        if tail is None:
            self.status = result.status
            return self.to_doc(result.merged)
        return self.to_doc(result.err + self.bash(tail, stdin=result.out))

    def bash(self, text: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            ["bash", "-c", f"(exit {self.status}); {text}"],
            cwd=self.cwd,
            env=self.env,
            input=stdin if stdin is not None else "",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
            check=False,
        )
        self.status = result.returncode
        return result.stdout
