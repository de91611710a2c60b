"""The README and docs/ as a user meets them: every Python block compiles, every command names a
file of this repository (or a known external program) and only options its argparse parser
declares, ``bnpass inspect`` commands parse with the CLI's own parser, and every relative link
(and its #anchor) resolves. Static reads of the sources: seconds, no process started."""

from __future__ import annotations

import ast
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Programs of commands that are checked (the first word after VAR=value assignments).
PROGRAMS = ("bash", "python", "torchrun", "bnpass")
# Scripts a command may name that are not in this repository, and who checks them.
EXTERNAL = {"train.py": "timm's train.py (tests/test_timm_train.py runs the README's command)"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def commands(text: str) -> list[str]:
    """Shell commands a page shows: every line of a bash block, "$ " lines of other blocks,
    indented (4-space) lines that start with a program, and inline code spans that do (a span may
    wrap across lines)."""
    found = []
    for lang, body in fenced_blocks(text):
        for line in body.splitlines():
            if lang == "bash" and line.strip() and not line.lstrip().startswith("#"):
                found.append(line)
            elif lang != "python" and line.startswith("$ "):
                found.append(line[2:])
    prose = FENCE.sub("", text)
    block: list[str] = []
    for line in prose.splitlines() + [""]:  # an indented block: its lines are one command
        if line.startswith("    ") and (block or _program(line)):
            block.append(line.strip())
        elif block:
            found.append(" ".join(block))
            block = []
    for span in re.findall(r"`([^`]+)`", re.sub(r"\s*\n\s*", " ", prose)):
        if _program(span):
            found.append(span)
    return found


def _program(command: str) -> str | None:
    words = command.split()
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    return words[0] if words and words[0] in PROGRAMS else None


@cache
def declared_options(script: Path) -> frozenset[str]:
    """The option strings of every ``add_argument`` call in a script (read, not run)."""
    options = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            options.update(a.value for a in node.args if isinstance(a, ast.Constant)
                           and isinstance(a.value, str) and a.value.startswith("-"))
    return frozenset(options)


def _words(command: str) -> tuple[list[str], bool]:
    """The command's words after environment assignments, without a trailing comment, and whether
    it is a synopsis (placeholders such as ``...`` or ``[--option]``: check names, do not parse)."""
    command = re.sub(r"\s+#\s.*$", "", command.strip())
    synopsis = "..." in command or "[" in command or "|" in command
    words = shlex.split(command.replace("[", " ").replace("]", " ").replace("|", " "))
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words = words[1:]
    return words, synopsis


def check_command(command: str) -> None:
    """Raise AssertionError naming what in ``command`` does not exist."""
    words, synopsis = _words(command)
    program, rest = words[0], words[1:]
    if program == "bash":
        assert (ROOT / rest[0]).is_file(), f"{command!r}: no file {rest[0]}"
        return
    if program == "torchrun":  # torchrun's own options, then the script
        rest = rest[next(i for i, w in enumerate(rest) if w.endswith(".py")):]
    elif program == "python" and rest[:1] == ["-m"]:
        module, rest = rest[1], rest[2:]
        if module == "bnpass":
            program = "bnpass"
        else:
            path = ROOT / module.replace(".", "/")
            script = path / "__main__.py" if path.is_dir() else path.with_suffix(".py")
            assert script.is_file(), f"{command!r}: no module {module} in this repository"
            _check_options(command, script, rest)
            return
    if program == "bnpass":
        from bnpass.inspect.cli import _parser

        if synopsis or not any(":" in w for w in rest):  # a synopsis, or a mention (no TARGET)
            _check_options(command, ROOT / "bnpass/inspect/cli.py", rest)
        else:
            try:
                _parser().parse_args(rest)
            except SystemExit:
                raise AssertionError(f"{command!r}: bnpass's own parser refuses it") from None
        return
    script = rest[0]
    if script in EXTERNAL:
        return
    assert (ROOT / script).is_file(), f"{command!r}: no file {script}"
    _check_options(command, ROOT / script, rest[1:])


def _check_options(command: str, script: Path, args: list[str]) -> None:
    declared = declared_options(script)
    used = {a.split("=")[0] for a in args if a.startswith("-") and a not in ("-", "--")}
    unknown = sorted(used - declared)
    assert not unknown, f"{command!r}: {script.relative_to(ROOT)} declares no {unknown}"


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation but - and _ dropped,
    spaces to -."""
    anchors = set()
    for line in FENCE.sub("", text).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_python_blocks_compile(page):
    blocks = [body for lang, body in fenced_blocks(page.read_text()) if lang == "python"]
    for i, body in enumerate(blocks):
        compile(body, f"{_page_id(page)} python block {i}", "exec")


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_commands_name_existing_files_and_options(page):
    problems = []
    for command in commands(page.read_text()):
        try:
            check_command(command)
        except AssertionError as e:
            problems.append(str(e))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{_page_id(page)}: link {target!r}: no {path}"
        if anchor:
            assert anchor in heading_anchors(dest.read_text()), \
                f"{_page_id(page)}: link {target!r}: no heading with that anchor in {path or 'this page'}"


def test_the_checks_catch_what_they_check():
    """The checks themselves: a missing file, an undeclared option, a refused bnpass command and a
    dangling anchor fail; the README's own commands are found."""
    for bad in ("bash scripts/nothing.sh", "python benchmarks/cold_compile.py --no-such-flag",
                "bnpass inspect torchvision:resnet18 --input-shape", "python -m tests.nothing"):
        with pytest.raises(AssertionError):
            check_command(bad)
    found = commands((ROOT / "README.md").read_text())
    assert "bash scripts/demo.sh      # the main job: a 2-rank CPU training demo (torchrun, gloo, synthetic data)" in found
    assert any(c.startswith("bnpass inspect torchvision:resnet18") for c in found)
    assert "how-it-works-step-by-step" in heading_anchors((ROOT / "docs/how-it-works.md").read_text())
