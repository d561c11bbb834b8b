"""Regenerate, or check, the console examples in README.md and docs/*.md.

    python tools/regenerate_docs.py            # rewrite every example block from a fresh run
    python tools/regenerate_docs.py --check    # exit 1 listing the blocks that differ from a fresh run

An example block in the markdown is

    <!-- example: NAME -->
    ```console
    $ openelm-mlx ...
    output
    ```
    <!-- /example -->

and everything between the two markers belongs to this script: EXAMPLES below says what NAME runs.
Each command runs as `python -m openelm_mlx.cli` in a subprocess (what a user sees, stdout and stderr
interleaved), in a scratch directory where the shared data (the docs models and the Llama-2
tokenizer, from ../shared/data beside the repository, or $OPENELM_MLX_DOCS_DATA) appear under their
own names, so the docs show `openelm-docs-target`, never a machine's path. Only deterministic
commands belong here: --help, error messages, greedy float32 generation. Examples that need the
shared data are skipped, and said to be, where it is absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("OPENELM_MLX_DOCS_DATA", ROOT.parent / "shared" / "data"))
# The names the shared data has in the scratch directory, and so in the docs.
DATA_NAMES = ("openelm-docs-target", "llama2-tokenizer.model")

BLOCK = re.compile(r"(<!-- example: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /example -->)", re.DOTALL)
COMMAND_WIDTH = 100  # wrap displayed commands with ` \` continuations past this many characters
# argparse wraps --help to the terminal width; fix it so the output does not depend on the terminal.
HELP_COLUMNS = "100"


@dataclasses.dataclass(frozen=True)
class Step:
    """One `openelm-mlx` command and what it is given."""

    args: Tuple[str, ...]
    stdin: Optional[str] = None  # text piped in, shown as `printf '...' |`
    stdin_file: Optional[str] = None  # a file in the scratch directory, shown as `< FILE`
    exit_status: int = 0  # anything else means the example broke: reported, block left alone
    elide: Optional[str] = None  # regex: a run of matching lines (progress counters) shows first, ..., last


@dataclasses.dataclass(frozen=True)
class Example:
    """What the block `<!-- example: NAME -->` shows: its commands, run one after the other."""

    steps: Tuple[Step, ...]
    needs_data: bool = False
    setup: Optional[Callable[[Path], None]] = None  # prepares the scratch directory


def _write_long_prompt(workdir: Path) -> None:
    # ~3000 tokens: more than OpenELM's 2048-token context.
    (workdir / "long-prompt.txt").write_text("the quick brown fox jumps over the lazy dog " * 340)


def _make_existing_out(workdir: Path) -> None:
    (workdir / "docs-4bit").mkdir()


def _make_folder_with_notes(workdir: Path) -> None:
    (workdir / "notes").mkdir()
    (workdir / "notes" / "todo.txt").write_text("not a conversion output\n")


CACHED_PREFIX = "The list data type has some more methods. Here are all of the methods of list objects:\n"


def _write_prefix(workdir: Path) -> None:
    (workdir / "list-intro.txt").write_text(CACHED_PREFIX)


TOKENIZER = ("--tokenizer", "llama2-tokenizer.model")
DOCS_TARGET = ("--model", "openelm-docs-target", *TOKENIZER)
GREEDY_F32 = ("--dtype", "float32")
# A small schema for the structured-output examples (docs/structured-output.md).
DOCS_SCHEMA = ('{"type": "object", "properties": {"function": {"type": "string", "maxLength": 20}, '
               '"returns": {"enum": ["list", "dict", "str", "None"]}, "since": {"type": "integer", "minimum": 2, '
               '"maximum": 3}}, "required": ["function", "returns", "since"], "additionalProperties": false}')
CONVERT_PROGRESS = r"(measuring sensitivity|converting): \d+/\d+ "

EXAMPLES: Dict[str, Example] = {
    "help": Example((Step(("--help",)),)),
    **{f"help-{name}": Example((Step((name, "--help")),))
       for name in ("generate", "chat", "serve", "convert", "bench", "cache-prompt")},
    "generate-greedy": Example((Step(("generate", *DOCS_TARGET, *GREEDY_F32, "--prompt", "To create a list, use",
                                      "--max-tokens", "32", "--quiet")),), needs_data=True),
    "generate-stop": Example((Step(("generate", *DOCS_TARGET, *GREEDY_F32, "--prompt", "Exceptions are",
                                    "--max-tokens", "100", "--stop", "versionadded", "--quiet")),), needs_data=True),
    "generate-stdin": Example((Step(("generate", *DOCS_TARGET, *GREEDY_F32, "--prompt", "-", "--max-tokens", "24",
                                     "--quiet"), stdin="def fibonacci(n):\n"),), needs_data=True),
    "generate-json-schema": Example((Step(("generate", *DOCS_TARGET, *GREEDY_F32, "--prompt", "The sorted() function",
                                           "--json-schema", DOCS_SCHEMA, "--max-tokens", "64", "--quiet")),),
                                    needs_data=True),
    "generate-choice": Example((Step(("generate", *DOCS_TARGET, *GREEDY_F32, "--prompt", "Is a tuple mutable? Answer:",
                                      "--choice", "yes", "--choice", "no", "--quiet")),), needs_data=True),
    "error-bad-schema": Example((Step(("generate", "--model", "synthetic:270M", "--prompt", "Hello", "--json-schema",
                                       '{"type": "array", "uniqueItems": true}'), exit_status=2),)),
    "chat-piped": Example((Step(("chat", *DOCS_TARGET, *GREEDY_F32, "--max-tokens", "30", "--stop", "\n\n"),
                                stdin="To create a list, use\nThe dictionary\n/reset\nExceptions are\n"),),
                          needs_data=True),
    "error-no-tokenizer": Example((Step(("generate", "--model", "openelm-docs-target", "--prompt", "Exceptions are"),
                                        exit_status=2),), needs_data=True),
    "error-prompt-too-long": Example((Step(("generate", *DOCS_TARGET, "--prompt", "-"), stdin_file="long-prompt.txt",
                                           exit_status=2),), needs_data=True, setup=_write_long_prompt),
    "error-bad-option": Example((Step(("generate", "--model", "synthetic:270M", "--prompt", "Hello",
                                       "--top-p", "1.5"), exit_status=2),)),
    "error-convert-out-exists": Example((Step(("convert", "openelm-docs-target", "docs-4bit", "--bits", "4"),
                                              exit_status=2),), needs_data=True, setup=_make_existing_out),
    "error-convert-force-refused": Example((Step(("convert", "openelm-docs-target", "notes", "--bits", "4", "--force"),
                                                 exit_status=2),), needs_data=True, setup=_make_folder_with_notes),
    "cache-prompt": Example((
        Step(("cache-prompt", *DOCS_TARGET, *GREEDY_F32, "--prompt-file", "list-intro.txt", "--out",
              "list-intro.safetensors")),
        Step(("generate", *DOCS_TARGET, *GREEDY_F32, "--prompt-cache", "list-intro.safetensors", "--prompt",
              CACHED_PREFIX + "list.append(x)", "--max-tokens", "24", "--quiet")),
        Step(("generate", *DOCS_TARGET, "--dtype", "bfloat16", "--prompt-cache", "list-intro.safetensors",
              "--prompt", CACHED_PREFIX, "--quiet"), exit_status=2),
    ), needs_data=True, setup=_write_prefix),
    "convert-4bit": Example((
        Step(("convert", "openelm-docs-target", "docs-4bit", "--bits", "4", *TOKENIZER), elide=CONVERT_PROGRESS),
        Step(("generate", "--model", "docs-4bit", "--prompt", "To create a list, use", "--max-tokens", "24",
              "--quiet")),
    ), needs_data=True),
}


def _shell_word(arg: str) -> str:
    # bash's $'...' shows a newline as \n, where shlex.quote would break the line.
    return "$'" + arg.replace("\n", "\\n") + "'" if "\n" in arg else shlex.quote(arg)


def display_command(step: Step) -> str:
    """The shell line a reader would type for `step`, wrapped with ` \\` continuations."""
    words = ["openelm-mlx", *(_shell_word(a) for a in step.args)]
    if step.stdin_file:
        words += ["<", step.stdin_file]
    lines, line = [], "$"
    if step.stdin is not None:
        assert "'" not in step.stdin and "%" not in step.stdin, "printf display needs plain text"
        line += " printf '" + step.stdin.replace("\n", "\\n") + "' |"
    # A flag and its value stay on one line.
    units: List[str] = []
    for word in words:
        if units and (units[-1] == "<" or units[-1].startswith("--") and " " not in units[-1]
                      and (word == "-" or not word.startswith("-"))):
            units[-1] += " " + word
        else:
            units.append(word)
    for unit in units:
        if len(line) + 1 + len(unit) > COMMAND_WIDTH and line.strip() not in ("$", ""):
            lines.append(line + " \\")
            line = "     "
        line += " " + unit
    return "\n".join(lines + [line])


def _elide(lines: List[str], pattern: Optional[str]) -> List[str]:
    """Collapse each run of 3+ lines matching `pattern` to its first line, '...', its last line."""
    if pattern is None:
        return lines
    out: List[str] = []
    run: List[str] = []
    for line in lines + [None]:  # type: ignore[list-item]
        if line is not None and re.match(pattern, line):
            run.append(line)
            continue
        out += run if len(run) < 3 else [run[0], "...", run[-1]]
        run = []
        if line is not None:
            out.append(line)
    return out


class BrokenExample(Exception):
    """A command exited with a status its example does not expect."""


class Runner:
    """Runs examples in one scratch directory per example, each at most once per Runner."""

    def __init__(self, data_dir: Path = DATA_DIR):
        self.data_dir = data_dir
        self.results: Dict[str, str] = {}
        self.broken: Dict[str, BrokenExample] = {}

    @property
    def has_data(self) -> bool:
        return all((self.data_dir / name).exists() for name in DATA_NAMES)

    def run_all(self, names: Sequence[str], jobs: int) -> None:
        """Run the examples `names` not run yet, `jobs` at a time (each is its own process)."""
        todo = [n for n in dict.fromkeys(names) if n not in self.results and n not in self.broken]
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for name, outcome in zip(todo, pool.map(self._run_safely, todo)):
                if isinstance(outcome, BrokenExample):
                    self.broken[name] = outcome
                else:
                    self.results[name] = outcome

    def _run_safely(self, name: str):
        try:
            return self._run(name, EXAMPLES[name])
        except BrokenExample as e:
            return e

    def output(self, name: str) -> str:
        """The console text of example `name` (commands and their output), from a fresh run."""
        self.run_all([name], jobs=1)
        if name in self.broken:
            raise self.broken[name]
        return self.results[name]

    def _run(self, name: str, example: Example) -> str:
        with tempfile.TemporaryDirectory(prefix="openelm-docs-") as tmp:
            workdir = Path(tmp)
            for data_name in DATA_NAMES:
                if (self.data_dir / data_name).exists():
                    (workdir / data_name).symlink_to((self.data_dir / data_name).resolve())
            if example.setup:
                example.setup(workdir)
            text = []
            for step in example.steps:
                text.append(display_command(step))
                text += _elide(self._run_step(name, step, workdir), step.elide)
            return "\n".join(text) + "\n"

    def _run_step(self, name: str, step: Step, workdir: Path) -> List[str]:
        # The reference BLAS, as in the tests: float32 results then do not depend on the machine's BLAS.
        env = {**os.environ, "COLUMNS": HELP_COLUMNS, "PYTHONUNBUFFERED": "1", "OPENELM_MLX_BLAS": "reference",
               "HF_HUB_OFFLINE": "1"}
        stdin = step.stdin if step.stdin is not None else (
            (workdir / step.stdin_file).read_text() if step.stdin_file else "")
        run = subprocess.run([sys.executable, "-m", "openelm_mlx.cli", *step.args], cwd=workdir, env=env,
                             input=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        text = run.stdout
        # Paths the program resolved: show them as the names the reader has.
        for path in sorted({str(workdir), os.path.realpath(workdir), str(self.data_dir),
                            os.path.realpath(self.data_dir)}, key=len, reverse=True):
            text = text.replace(path + os.sep, "").replace(path, ".")
        if run.returncode != step.exit_status:
            raise BrokenExample(f"example {name}: `{display_command(step)[2:]}` exited with status "
                                f"{run.returncode}, expected {step.exit_status}:\n{text[-2000:]}")
        # Trailing spaces do not survive editors; drop them on both sides of the comparison.
        return [line.rstrip() for line in text.rstrip("\n").split("\n")] if text.strip() else []


def render_block(body: str) -> str:
    return "```console\n" + body + "```\n"


def _normalise(block: str) -> str:
    return "\n".join(line.rstrip() for line in block.strip("\n").split("\n"))


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def doc_files(root: Path = ROOT) -> List[Path]:
    """README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _wanted(name: str, runner: Runner, only: Optional[Sequence[str]]) -> bool:
    return name in EXAMPLES and (not only or name in only) and (runner.has_data or not EXAMPLES[name].needs_data)


def process(files: Sequence[Path], runner: Runner, *, write: bool, only: Optional[Sequence[str]] = None,
            jobs: int = 2) -> Tuple[List[str], List[str]]:
    """Regenerate (write=True) or compare the example blocks of `files`.

    Returns (problems, skipped): lines naming each block that differs, is unknown or broke, and each
    block skipped for want of the shared data.
    """
    problems: List[str] = []
    skipped: List[str] = []
    runner.run_all([m["name"] for path in files for m in BLOCK.finditer(path.read_text())
                    if _wanted(m["name"], runner, only)], jobs)
    for path in files:
        text = path.read_text()
        pieces: List[str] = []
        last = 0
        for match in BLOCK.finditer(text):
            name, body = match["name"], match["body"]
            where = f"{_shown_path(path)}:{text.count(chr(10), 0, match.start()) + 1}"
            pieces.append(text[last:match.start("body")])
            last = match.end("body")
            if name not in EXAMPLES:
                problems.append(f"{where}: unknown example {name!r} (known: {', '.join(EXAMPLES)})")
                pieces.append(body)
                continue
            if not _wanted(name, runner, only):
                if not only or name in only:
                    skipped.append(f"{where}: example {name} (needs the shared data in {runner.data_dir})")
                pieces.append(body)
                continue
            try:
                fresh = render_block(runner.output(name))
            except BrokenExample as e:
                problems.append(f"{where}: {e}")
                pieces.append(body)
                continue
            if _normalise(fresh) != _normalise(body):
                if not write:
                    diff = difflib.unified_diff(_normalise(body).split("\n"), _normalise(fresh).split("\n"),
                                                "in the file", "from a fresh run", lineterm="", n=1)
                    problems.append(f"{where}: example {name} differs from a fresh run\n    "
                                    + "\n    ".join(list(diff)[:40]))
            pieces.append(fresh if write else body)
        pieces.append(text[last:])
        if write and "".join(pieces) != text:
            path.write_text("".join(pieces))
    return problems, skipped


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any block differs")
    parser.add_argument("--only", action="append", metavar="NAME", help="only this example (repeatable)")
    parser.add_argument("--jobs", type=int, default=2, help="examples run at once (default %(default)s)")
    parser.add_argument("files", nargs="*", type=Path, help="markdown files (default: README.md and docs/*.md)")
    args = parser.parse_args(argv)
    problems, skipped = process(args.files or doc_files(), Runner(), write=not args.check, only=args.only,
                                jobs=args.jobs)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print("examples up to date" if args.check else "examples regenerated", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
