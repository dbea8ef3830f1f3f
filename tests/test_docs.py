"""The README and docs/ against the code: every ``wsss`` command shown parses, every config a
page names exists and loads, every relative link resolves, the README's headline figures are
the results page's, and each DAG picture is the one the registry draws."""

from __future__ import annotations

import functools
import itertools
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[^\n]*\n(.*?)```", re.S)
INLINE = re.compile(r"`(wsss [^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CONFIG = re.compile(r"configs/[\w{},/.-]+?\.yaml")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def commands(text: str) -> list[str]:
    """The ``wsss ...`` commands of a page: lines of its code blocks and inline code spans."""
    found = [m.group(1) for m in INLINE.finditer(text)]
    for block in FENCE.findall(text):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("wsss "):
                found.append(line)
    return found


def _words(command: str) -> list[str]:
    """The command's words without its shell comment and its ``[...]`` option placeholders."""
    command = re.sub(r"\s#.*$", "", command)
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


@functools.cache
def help_of(sub: str) -> str:
    res = CliRunner().invoke(app, [sub, "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, f"wsss {sub} --help: {res.output}"
    return res.output


def _braces(path: str) -> list[str]:
    """``a_{b,c}.yaml`` -> ``a_b.yaml``, ``a_c.yaml``."""
    parts = re.split(r"\{([^}]*)\}", path)
    options = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(choice) for choice in itertools.product(*options)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_wsss_command_shown_parses(page):
    shown = commands(page.read_text())
    for command in shown:
        words = _words(command)
        sub = words[1] if len(words) > 1 else ""
        assert sub in {c.name or c.callback.__name__ for c in app.registered_commands}, f"{_name(page)}: {command}"
        helptext = help_of(sub)
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", " ".join(words[2:])):
            assert flag in helptext, f"{_name(page)}: `{command}`: wsss {sub} has no {flag}"


def test_the_pages_show_commands():
    assert sum(len(commands(p.read_text())) for p in PAGES) > 40


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_config_a_page_names_exists_and_loads(page):
    for match in sorted(set(CONFIG.findall(page.read_text()))):
        for path in _braces(match):
            if "/_base_/" in path:  # a base alone is a fragment: it must exist
                assert (ROOT / path).is_file(), f"{_name(page)} names {path}, which does not exist"
                continue
            assert (ROOT / path).is_file(), f"{_name(page)} names {path}, which does not exist"
            load_config(ROOT / path)


def test_the_readme_methods_table_names_shipped_configs():
    text = (ROOT / "README.md").read_text()
    table = text.split("## Methods", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 6
    for row in rows:
        for name in re.findall(r"`([\w{},]+)`", row.split("|")[3]):
            for config in _braces(name):
                assert (ROOT / "configs" / f"{config}.yaml").is_file(), f"README methods table: {config}"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_resolves(page):
    text = page.read_text()
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{_name(page)}: link {target} points nowhere"
        if anchor and dest.suffix == ".md":
            headings = {slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), re.M)}
            assert anchor in headings, f"{_name(page)}: link {target}: no heading '{anchor}' in {dest.name}"


def _headline(path: Path) -> str:
    text = path.read_text()
    start, end = text.index("<!-- headline -->"), text.index("<!-- /headline -->")
    return text[start:end]


def test_the_readme_headline_figures_are_the_results_pages():
    readme, results = _headline(ROOT / "README.md"), _headline(ROOT / "docs" / "results.md")
    assert readme == results
    assert len(re.findall(r"\d\.\d{3}", readme)) > 20


@pytest.mark.parametrize("page", [p for p in PAGES if "<!-- dag:" in p.read_text()], ids=_name)
def test_each_dag_picture_is_the_registrys(page):
    from pipeline.dag import make_run, mermaid

    text = page.read_text()
    for config, sets, block in re.findall(r"<!-- dag: (\S+) ?([^>]*)-->\n```mermaid\n(.*?)```", text, re.S):
        run = make_run(load_config(ROOT / config, sets.split()))
        assert block.strip() == mermaid(run), f"{_name(page)}: the DAG of {config} {sets} changed: `wsss dag`"


def test_no_issue_numbers_or_work_notes_in_the_docs_and_code():
    pattern = re.compile(r"\bissue \d+|\(issue|this session|last session", re.I)
    files = [*PAGES, *ROOT.glob("configs/**/*.yaml"), *ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py")]
    files += [*ROOT.glob("models/*.py"), *ROOT.glob("tests/*.py")]
    hits = [
        f"{_name(f)}:{n}"
        for f in files
        if f.name != "test_docs.py"
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits


def test_the_readme_is_one_screen_and_an_index():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    first_screen = "\n".join(text.splitlines()[:60])
    assert "own-data.md" in first_screen or "own boxes" in first_screen.lower()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in text, f"the README's index does not link docs/{page.name}"
