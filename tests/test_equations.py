"""The equation index (docs/equations.md) against the code: every function it names exists and cites its
equation, every equation cited in models/ is listed, and no equation of the thesis' Ch. 3 or
of the DFR paper is missing."""

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# "Eq. 3.20", "DFR Eq. 4-5", "Tang Eq. 4", "thesis Eq. 3.6-3.13", "Eq. 3.7 / 3.11"
CITE = re.compile(
    r"(?:\b(DFR|Tang|BLPSeg|SPML|thesis) )?\bEq\. ?\(?(\d+(?:\.\d+)?)(?:\s*-\s*(\d+(?:\.\d+)?))?"
    r"((?:\s*/\s*\d+(?:\.\d+)?)*)"
)


def expand(paper: str | None, first: str, last: str | None, more: str = "") -> set[tuple[str, str]]:
    """``(paper, number)`` of every equation a citation names; a number with a dot is the
    thesis' (chapter.equation), one without must name its paper."""
    paper = paper or ("thesis" if "." in first else None)
    if paper is None:
        raise AssertionError(
            f"'Eq. {first}' names no paper: write 'DFR Eq. {first}', 'BLPSeg Eq. {first}' or 'Tang Eq. {first}'"
        )
    numbers = [first, *re.findall(r"\d+(?:\.\d+)?", more)]
    if last is not None:
        if "." in first:
            (chapter, a), (_, b) = first.split("."), last.split(".")
            numbers += [f"{chapter}.{k}" for k in range(int(a) + 1, int(b) + 1)]
        else:
            numbers += [str(k) for k in range(int(first) + 1, int(last) + 1)]
    return {(paper, n) for n in numbers}


def cited(text: str) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for m in CITE.finditer(text):
        out |= expand(*m.groups())
    return out


def index() -> dict[tuple[str, str], list[str]]:
    """``(paper, number) -> function paths`` from the equation index table."""
    section = (ROOT / "docs" / "equations.md").read_text()
    rows: dict[tuple[str, str], list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or "Eq." not in cells[0]:
            continue
        functions = re.findall(r"`([\w.]+)`", cells[2])
        assert functions, line
        for key in cited(cells[0]):
            rows.setdefault(key, []).extend(functions)
    return rows


def resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_citations_parse_ranges_alternatives_and_papers():
    assert cited("Eq. 3.6-3.8 and DFR Eq. 10-11") == {
        ("thesis", "3.6"),
        ("thesis", "3.7"),
        ("thesis", "3.8"),
        ("DFR", "10"),
        ("DFR", "11"),
    }
    assert cited("(thesis Eq. 3.7 / 3.11)") == {("thesis", "3.7"), ("thesis", "3.11")}
    with pytest.raises(AssertionError, match="names no paper"):
        cited("the loss of Eq. 4")


def test_every_indexed_function_exists_and_cites_its_equation():
    for (paper, number), paths in index().items():
        for path in paths:
            obj = resolve(path)
            doc = inspect.getdoc(obj) or ""
            module_doc = inspect.getdoc(inspect.getmodule(obj)) or ""
            assert (paper, number) in cited(doc) | cited(module_doc), f"{path} does not cite {paper} Eq. {number}"


def test_every_equation_cited_in_models_is_indexed():
    listed = set(index())
    for path in sorted((ROOT / "models").glob("*.py")):
        missing = cited(path.read_text()) - listed
        assert not missing, f"{path.name} cites equations the equation index does not list: {sorted(missing)}"


def test_the_index_covers_thesis_chapters_2_and_3_the_dfr_paper_blpseg_and_spml():
    listed = set(index())
    wanted = (
        {("thesis", f"2.{k}") for k in range(1, 27)}
        | {("thesis", f"3.{k}") for k in range(1, 29)}
        | {("DFR", str(k)) for k in range(1, 14)}
        | {("BLPSeg", str(k)) for k in range(1, 13)}
        | {("SPML", str(k)) for k in (1, 3, 4)}
    )
    assert not wanted - listed, sorted(wanted - listed)
