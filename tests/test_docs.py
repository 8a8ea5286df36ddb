"""The documentation site stays in step with the code: the generated configuration reference is current,
names every key of the ``acco`` block, and every page under ``docs/`` is reachable from ``mkdocs.yml``'s nav.
The README stays a front page (line and word limits, the two commands first).

In-process and fast (no engine, no process group). Run alone: ``python -m pytest -q tests/test_docs.py``.
The strict site build itself (broken links and anchors) is ``mkdocs build --strict`` in ``.ci/run``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pathspec
import pytest
import yaml

from deepspeed_acco.config import AccoConfig
from deepspeed_acco.config_reference import REGENERATE, field_docstrings, render

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGE = DOCS / "configuration.md"


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is exactly what the generator writes from the code."""
    assert PAGE.is_file(), f"{PAGE} is missing; generate it with: {REGENERATE}"
    if PAGE.read_text() != render():
        pytest.fail(f"docs/configuration.md is stale (AccoConfig or a refusal changed); regenerate it with: "
                    f"{REGENERATE}")


def test_configuration_reference_names_every_key() -> None:
    """Every key of AccoConfig has a heading, a table row and its docstring on the page."""
    page = PAGE.read_text()
    docs = field_docstrings()
    for key in AccoConfig.model_fields:
        assert f"### `{key}`" in page, f"acco.{key} has no section in docs/configuration.md; run: {REGENERATE}"
        assert f"| [`{key}`](#{key}) |" in page, f"acco.{key} has no table row in docs/configuration.md"
        assert key in docs and docs[key].strip(), f"acco.{key} has no docstring in deepspeed_acco/config.py"


def _nav_pages(nav: Any) -> set[str]:
    """Every page path in an mkdocs nav (a list of strings and one-key mappings, nested)."""
    pages: set[str] = set()
    if isinstance(nav, str):
        pages.add(nav)
    elif isinstance(nav, list):
        for item in nav:
            pages |= _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            pages |= _nav_pages(value)
    return pages


def test_every_page_is_in_nav() -> None:
    """No page under docs/ is orphaned, and nav names no page that does not exist."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    nav = {page for page in _nav_pages(config["nav"]) if not page.startswith(("http://", "https://"))}
    # mkdocs.yml's exclude_docs (gitignore patterns, read as MkDocs reads them) keeps files out of the site.
    excluded = pathspec.GitIgnoreSpec.from_lines((config.get("exclude_docs") or "").splitlines())
    on_disk = set()
    for root, _, files in os.walk(DOCS, followlinks=True):  # docs/results links to benchmarks/results
        on_disk |= {(Path(root) / name).relative_to(DOCS).as_posix() for name in files if name.endswith(".md")}
    on_disk = {page for page in on_disk if not excluded.match_file(page)}
    assert not on_disk - nav, f"pages not in mkdocs.yml's nav: {sorted(on_disk - nav)}"
    assert not nav - on_disk, f"nav entries with no page under docs/: {sorted(nav - on_disk)}"


README_MAX_LINES, FIRST_PARAGRAPH_MAX_WORDS = 200, 90


def test_readme_is_a_front_page() -> None:
    """The README stays a page a newcomer reads in minutes: at most 200 lines, a first paragraph of at most 90
    words, and its first code block is the two commands (the main job, then the tests)."""
    text = (REPO / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}); " \
        "move details into docs/"
    first = " ".join(text.split("\n\n")[1].split()) if lines[0].startswith("#") else ""
    words = len(first.split())
    assert 0 < words <= FIRST_PARAGRAPH_MAX_WORDS, \
        f"README.md's first paragraph has {words} words (at most {FIRST_PARAGRAPH_MAX_WORDS}): {first[:200]}"
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split()[:2] for line in block] == [["bash", "scripts/run_main_job.sh"], ["bash", ".ci/run"]], block
