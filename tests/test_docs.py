"""README.md and docs/: examples equal fresh runs, commands and flags exist, links resolve, no machine paths."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest

from openelm_mlx.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("regenerate_docs", ROOT / "tools" / "regenerate_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


docs = _load_script()
DOC_FILES = docs.doc_files()
SUBCOMMANDS = ("generate", "chat", "serve", "convert", "bench")


@pytest.fixture(scope="module")
def runner():
    return docs.Runner()


def _names_in_docs(needs_data: bool):
    names = {m["name"] for path in DOC_FILES for m in docs.BLOCK.finditer(path.read_text())}
    return sorted(n for n in names if n in docs.EXAMPLES and docs.EXAMPLES[n].needs_data == needs_data)


def test_examples_without_shared_data_equal_a_fresh_run(runner):
    """--help of every subcommand and the errors that need no model, as the current code prints them."""
    names = _names_in_docs(needs_data=False)
    assert {"help", "help-generate", "help-convert"} <= set(names)
    problems, _ = docs.process(DOC_FILES, runner, write=False, only=names)
    assert not problems, "\n".join(problems) + "\nrun: python tools/regenerate_docs.py"


@pytest.mark.slow
def test_examples_with_shared_data_equal_a_fresh_run(runner):
    """Greedy generation, chat, conversion and their errors on the docs models."""
    if not runner.has_data:
        pytest.skip(f"the docs models are not in {runner.data_dir}")
    names = _names_in_docs(needs_data=True)
    assert {"generate-greedy", "chat-piped", "convert-4bit"} <= set(names)
    problems, skipped = docs.process(DOC_FILES, runner, write=False, only=names)
    assert not skipped
    assert not problems, "\n".join(problems) + "\nrun: python tools/regenerate_docs.py"


def _block(name: str) -> str:
    """The marked block `name` as it stands in the docs, markers included."""
    for path in DOC_FILES:
        match = re.search(rf"<!-- example: {re.escape(name)} -->\n.*?<!-- /example -->", path.read_text(), re.DOTALL)
        if match:
            return match[0]
    raise AssertionError(f"no block {name}")


def test_a_hand_edited_block_fails_the_check_and_regeneration_restores_it(runner, tmp_path):
    page = tmp_path / "page.md"
    original = f"# A page\n\n{_block('help-generate')}\n\ntext after\n"
    page.write_text(original)
    assert docs.process([page], runner, write=False, only=["help-generate"]) == ([], [])

    edited = original.replace("\n```\n<!-- /example -->", "\na line added by hand\n```\n<!-- /example -->")
    assert edited != original
    page.write_text(edited)
    problems, _ = docs.process([page], runner, write=False, only=["help-generate"])
    assert len(problems) == 1 and "page.md:3: example help-generate differs" in problems[0], problems
    assert page.read_text() == edited  # --check changes nothing

    assert docs.process([page], runner, write=True, only=["help-generate"]) == ([], [])
    assert page.read_text() == original


def test_an_unknown_or_broken_example_is_reported(runner, tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("<!-- example: no-such-example -->\n<!-- /example -->\n")
    problems, _ = docs.process([page], runner, write=True)
    assert len(problems) == 1 and "unknown example 'no-such-example'" in problems[0]

    # A command whose exit status is not the one its example expects (here: a flag that does not exist).
    broken = docs.Example((docs.Step(("generate", "--model", "synthetic:270M", "--prompt", "x", "--no-such-flag")),))
    monkeypatch.setitem(docs.EXAMPLES, "broken", broken)
    page.write_text("<!-- example: broken -->\nkept\n<!-- /example -->\n")
    problems, _ = docs.process([page], docs.Runner(), write=True)
    assert len(problems) == 1 and "exited with status 2, expected 0" in problems[0]
    assert "unrecognized arguments: --no-such-flag" in problems[0]
    assert page.read_text() == "<!-- example: broken -->\nkept\n<!-- /example -->\n"  # left alone


def test_check_command_exits_non_zero_listing_the_differing_block(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text(_block("help-serve").replace("$ openelm-mlx serve --help\n", "$ openelm-mlx serve --help\nedited\n"))
    assert docs.main(["--check", "--only", "help-serve", str(page)]) == 1
    assert "page.md:1: example help-serve differs from a fresh run" in capsys.readouterr().err


def test_displayed_commands_are_shell_lines_a_reader_can_type():
    step = docs.Step(("chat", "--model", "openelm-docs-target", "--stop", "\n\n"), stdin="hello\n/reset\n")
    assert docs.display_command(step) == (
        "$ printf 'hello\\n/reset\\n' | openelm-mlx chat --model openelm-docs-target --stop $'\\n\\n'")
    long = docs.display_command(docs.Step(("generate", "--prompt", "x" * 60, "--model", "y" * 30)))
    first, second = long.split("\n")
    assert first.endswith(" \\") and second.strip() == "--model " + "y" * 30  # a flag keeps its value


def _help(args) -> str | None:
    """`openelm-mlx ARGS --help` as printed, or None if the parser refuses ARGS."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()), \
            pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--help"])
    return out.getvalue() if exit_info.value.code == 0 else None


def _fenced_blocks(text: str):
    """(language, body) of each fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def _command_lines(text: str):
    """Shell commands the text shows: `$ ` lines of console blocks, bash lines, inline code spans."""
    commands = []
    for language, body in _fenced_blocks(text):
        joined = body.replace("\\\n", " ")  # continuation lines
        for line in joined.split("\n"):
            if language == "console" and line.startswith("$ "):
                commands.append(line[2:])
            elif language == "bash" and not line.lstrip().startswith("#"):
                commands.append(line)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    commands += re.findall(r"`([^`\n]+)`", prose)
    return commands


INVOCATION = re.compile(r"(?:openelm-mlx|python -m openelm_mlx\.(convert))(?:\s+(?!-)(\S+))?([^|;&#]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def test_every_subcommand_and_flag_the_docs_name_is_accepted():
    """Each `openelm-mlx SUB --flag` in a command, and each lone `--flag` on SUB's own page, is in SUB's
    --help. Flags other branches are adding fail here until those branches are merged."""
    helps = {}
    missing = []
    for path in DOC_FILES:
        text = path.read_text()
        used = []  # (subcommand, flag)
        for command in _command_lines(text):
            for match in INVOCATION.finditer(command):
                sub = match[1] or match[2]
                if sub is None:
                    continue
                used += [(sub, flag) for flag in FLAG.findall(match[3])]
                used.append((sub, None))
        if path.stem in SUBCOMMANDS:  # docs/generate.md etc.: bare flags belong to that subcommand
            used += [(path.stem, span.split()[0]) for span in re.findall(r"`(--[^`\n]+)`", text)]
        for sub, flag in used:
            if sub not in helps:
                helps[sub] = _help([sub])
            if helps[sub] is None:
                missing.append(f"{path.name}: openelm-mlx {sub} (no such subcommand)")
            elif flag and not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[sub]):
                missing.append(f"{path.name}: openelm-mlx {sub} {flag}")
    assert set(helps) >= set(SUBCOMMANDS)
    assert not missing, "\n".join(sorted(set(missing)))


def test_the_flag_check_catches_an_unknown_flag():
    assert "--max-tokens" in _help(["generate"])
    assert not re.search(r"(?<![\w-])--max-token(?![\w-])", _help(["generate"]))
    assert _help(["no-such-subcommand"]) is None
    (match,) = INVOCATION.finditer("printf 'x' | openelm-mlx chat --model M --raw | head -1")
    assert match[2] == "chat" and FLAG.findall(match[3]) == ["--model", "--raw"]


def test_readme_keeps_the_two_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().split("\n")[-1]
    assert ci_command.startswith("python3 -m venv .venv && ")
    assert ci_command in readme
    bench = "python3 -m venv .venv && .venv/bin/pip install '.[cpu-blas]' && .venv/bin/openelm-mlx bench"
    assert bench in readme


def test_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().split("\n")
    assert len(lines) <= 200
    for heading in ("## Install", "## Two commands", "## A 30-second tour", "## Headline figures"):
        assert heading in lines


def test_docs_name_no_machine_paths_or_internal_jargon():
    for path in DOC_FILES:
        text = path.read_text()
        for pattern in (r"/work/", r"/tmp/", r"shared/data/", r"\bmain job\b", r"\b2x (GPU )?goal\b"):
            assert not re.search(pattern, text), f"{path.name}: {pattern}"


def _anchors(text: str):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", headings, re.MULTILINE)}


def test_relative_links_and_anchors_resolve():
    broken = []
    for path in DOC_FILES:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"\w+://", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.name}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{path.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
