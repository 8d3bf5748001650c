"""The documents say what was measured and made: README claims are rows of Docs/benchmarks.md, and every
picture in the user guide is one that Docs/make_screenshots.py renders.

Specification: each row of the README's claims table names a value, a section of Docs/benchmarks.md (its
``<!-- key:begin -->`` marker) and the label of a table row there; that row exists and contains the value.
Each ``images/<name>.png`` the user guide shows exists and is written by the screenshot script.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def benchmark_section(key: str) -> str:
    text = (ROOT / "Docs" / "benchmarks.md").read_text()
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    assert begin in text and end in text, f"Docs/benchmarks.md has no section '{key}'"
    return text[text.index(begin):text.index(end)]


def readme_claims() -> list[tuple[str, str, str, str]]:
    """(claim, value, section key, row label) from the README's claims table."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (.+?) \| `([^`]+)` \| `([\w-]+)` \| (.+?) \|$", readme, flags=re.MULTILINE)
    return [(claim, value, key, row) for claim, value, key, row in rows]


def test_every_readme_claim_is_a_row_of_the_benchmark_document():
    claims = readme_claims()
    assert len(claims) >= 10, "the README's claims table was not found"
    for claim, value, key, row in claims:
        section = benchmark_section(key)
        rows = [line for line in section.splitlines() if line.startswith(f"| {row} |")]
        assert rows, f"README claim '{claim}': section '{key}' has no row '{row}'"
        cells = [cell.strip() for line in rows for cell in line.split("|")]
        assert value in cells, f"README claim '{claim}': {value} is not in row '{row}' of '{key}': {rows}"


def test_every_picture_in_the_user_guide_is_made_by_the_screenshot_script():
    guide = (ROOT / "Docs" / "user_guide.md").read_text()
    script = (ROOT / "Docs" / "make_screenshots.py").read_text()
    pictures = set(re.findall(r"\(images/([\w-]+)\.png\)", guide))
    assert len(pictures) >= 10
    for name in sorted(pictures):
        assert (ROOT / "Docs" / "images" / f"{name}.png").is_file(), f"Docs/images/{name}.png is missing"
        assert f'"{name}"' in script or f'"{name}.png"' in script, \
            f"Docs/images/{name}.png is shown in the guide but not made by Docs/make_screenshots.py"
