"""The documentation: committed reports, the numbers copied from them, and the links between pages.

A report is rendered from its results.json alone, so re-rendering must reproduce it byte for byte (else the
renderer changed under it, and the report must be re-rendered). The method tables of README.md and docs/*.md are
copied from the reports ("Methods compared"), with leading zeros dropped; a number that is not in its report fails
here. The README is the entrance (short); every relative link and every repository path a page names must exist.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from steer.experiments.study.report import render_report

ROOT = Path(__file__).resolve().parent.parent
REPORTS = sorted(p.parent for p in (ROOT / "docs").rglob("results.json") if (p.parent / "report.md").exists())
README_METHOD = {"experts (neuron)": "experts", "LAPE (activation)": "lape", "DiffMean (residual)": "diffmean",
                 "random neurons": "random"}


@pytest.mark.parametrize("folder", REPORTS, ids=[str(p.relative_to(ROOT)) for p in REPORTS])
def test_committed_report_rerenders_from_its_json(folder):
    results = json.loads((folder / "results.json").read_text())
    assert render_report(results, folder) == (folder / "report.md").read_text(), (
        f"{folder}/report.md is not what its results.json renders to: run `steer study --render "
        f"{folder}/results.json`")


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    """Cells of the rows of the first markdown table in `text` whose header starts with `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _short(x: str) -> str:
    """0.023 -> .023, +0.001 -> +.001, -0.007 -> -.007 (the README's number style)."""
    return re.sub(r"(?<![\d.])([-+]?)0\.(\d)", r"\1.\2", x)


#: the hand-written pages: the README and docs/*.md (the reports under docs/*/ are rendered, tested above)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: every markdown page of the repository's documentation, rendered reports included
ALL_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 250


def _method_sections() -> list[tuple[Path, str, Path]]:
    """(page, section text, report folder) for every section of a page that tabulates a methods report:
    it links `.../methods/<model>/report.md` (relative to the page) and holds a `| method (site) |` table."""
    out = []
    for page in PAGES:
        for section in re.split(r"\n(?=#{1,3} )", page.read_text()):
            link = re.search(r"\]\(([^)]*methods/[^)]+)/report\.md\)", section)
            if link and "| method (site) |" in section:
                out.append((page, section, (page.parent / link.group(1)).resolve()))
    return out


def test_method_tables_come_from_the_reports():
    sections = _method_sections()
    assert sections, "no page tabulates a methods report"
    for page, section, folder in sections:
        where = f"{page.relative_to(ROOT)} ({folder.relative_to(ROOT)})"
        assert (folder / "report.md").exists(), f"{where}: the linked report does not exist"
        report = {(r[0], r[1]): r for r in _table_rows((folder / "report.md").read_text(), "method")}
        page_rows = _table_rows(section, "method (site)")
        assert len(page_rows) == len(report), f"{where}: the page has {len(page_rows)} rows, the report {len(report)}"
        for row in page_rows:
            method, target, chosen, prepost, delta_a, a_rev, b, dist, gen, ppl = row
            r = report[README_METHOD[method], target]
            want_prepost, want_delta = r[4].split(", Δ ")
            assert [chosen, prepost, delta_a, a_rev, b, dist, gen, ppl] == [
                _short(r[3].replace("top_rate=", "top_rate ")), _short(want_prepost), _short(want_delta),
                _short(r[5]), _short(r[6]), _short(r[7]), _short(r[9]), _short(r[10])], f"{where}: {method} {target}"


def test_readme_is_an_entrance():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the detail into docs/ and link it")
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", "\n".join(lines)))
    pages = {str(p.relative_to(ROOT)) for p in PAGES[1:]}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _outside_code(text: str) -> str:
    """The text of a markdown page without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _links(text: str) -> list[str]:
    """Targets of the inline links and images of a markdown text, outside code blocks and code spans."""
    text = re.sub(r"`[^`\n]*`", "", _outside_code(text))
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


@pytest.mark.parametrize("page", ALL_PAGES, ids=[str(p.relative_to(ROOT)) for p in ALL_PAGES])
def test_relative_links_resolve(page):
    """Every relative link of a page names a file or folder of the repository, and an anchor names a
    heading of the page it points to."""
    broken = []
    for target in _links(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or ROOT not in (dest, *dest.parents):
            broken.append(target)
        elif anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", _outside_code(dest.read_text()), flags=re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links that do not resolve: {broken}"


#: first folders of the repository paths the pages name in code spans (`steer/core/adapters.py::NeuronLayout`)
REPO_FOLDERS = ("steer", "kernels", "bench", "tests", "docs", ".ci")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_named_repository_paths_exist(page):
    """A page names no file that is not in the repository: each code span that is a path under one of
    REPO_FOLDERS (a `::name` suffix dropped, globs expanded) exists, from the repository root."""
    missing = []
    for span in re.findall(r"`([^`\n]+)`", _outside_code(page.read_text())):
        path = span.split("::")[0].rstrip("/")
        if " " in path or not re.match(rf"({'|'.join(map(re.escape, REPO_FOLDERS))})/", path):
            continue
        if not (any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
            missing.append(span)
    assert not missing, f"{page.relative_to(ROOT)} names paths that are not in the repository: {missing}"
