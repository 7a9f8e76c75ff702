"""The committed study reports and the README's numbers: both must come from the committed results.json.

A report is rendered from its results.json alone, so re-rendering must reproduce it byte for byte (else the
renderer changed under it, and the report must be re-rendered). The README's method tables are copied from the
reports ("Methods compared"), with leading zeros dropped; a README number that is not in its report fails here.
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


def _readme_method_sections() -> list[tuple[str, str]]:
    """(report folder, section text) for every README subsection that tabulates a methods report."""
    readme = (ROOT / "README.md").read_text()
    out = []
    for section in re.split(r"\n(?=### )", readme):
        link = re.search(r"\((docs/methods/[^)]+)/report\.md\)", section)
        if link and "| method (site) |" in section:
            out.append((link.group(1), section))
    return out


def test_readme_method_tables_come_from_the_reports():
    sections = _readme_method_sections()
    assert sections, "the README tabulates no methods report"
    for folder, section in sections:
        report = {(r[0], r[1]): r for r in _table_rows((ROOT / folder / "report.md").read_text(), "method")}
        readme_rows = _table_rows(section, "method (site)")
        assert len(readme_rows) == len(report), f"{folder}: README has {len(readme_rows)} rows, report {len(report)}"
        for row in readme_rows:
            method, target, chosen, prepost, delta_a, a_rev, b, dist, gen, ppl = row
            r = report[README_METHOD[method], target]
            want_prepost, want_delta = r[4].split(", Δ ")
            assert [chosen, prepost, delta_a, a_rev, b, dist, gen, ppl] == [
                _short(r[3].replace("top_rate=", "top_rate ")), _short(want_prepost), _short(want_delta),
                _short(r[5]), _short(r[6]), _short(r[7]), _short(r[9]), _short(r[10])], f"{folder}: {method} {target}"
