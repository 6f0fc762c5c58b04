"""The documentation site builds with `mkdocs build --strict` (a broken link, a missing anchor, a page left out of
the nav or an API object mkdocstrings cannot find fails), and README's links into it point at pages that exist."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def _require_mkdocs() -> None:
    for name in DOCS_PACKAGES:
        pytest.importorskip(name, reason="the docs build needs the [dev] extra (mkdocs-material, mkdocstrings[python])")


def build_site(project: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(project / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def test_the_site_builds_strictly(tmp_path):
    _require_mkdocs()
    result = build_site(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for name in ("SAPOConfig", "SAPOTrainer", "ReplayBuffer", "rewrite_segments", "ema_update_", "SegmentSampler"):
        assert name in api, name
    config = (tmp_path / "site" / "guides" / "config" / "index.html").read_text()
    assert "--ema_beta" in config and "--generation_engine" in config


def test_a_broken_link_fails_the_build(tmp_path):
    """The check above can fail: the same site with one link to a page that does not exist is refused."""
    _require_mkdocs()
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", project / "docs")
    (project / "src").symlink_to(ROOT / "src")
    page = project / "docs" / "guides" / "faq.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    result = build_site(project, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stdout + result.stderr


def _anchors(markdown: str) -> set[str]:
    """The ids mkdocs' toc extension gives the page's headings (its default slugify)."""
    from markdown.extensions.toc import slugify

    text = re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)
    return {slugify(re.sub(r"[`*]", "", h), "-") for h in re.findall(r"^#{1,6} (.+?)\s*$", text, re.MULTILINE)}


def test_readme_links_into_the_docs_point_at_pages_and_headings_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) >= 10, "README is the front door: it links into the docs"
    for target, anchor in links:
        path = ROOT / target
        assert path.is_file(), f"README links to {target}, which does not exist"
        if anchor:
            assert anchor in _anchors(path.read_text()), f"README links to {target}#{anchor}: no such heading"


def _measured_section(readme: str) -> str:
    return readme.split("\n## Measured\n", 1)[1].split("\n## ", 1)[0]


def test_every_figure_readme_quotes_is_on_a_dated_results_page():
    """README quotes only figures it reproduces: each number and date of its "Measured" section (outside code
    spans and links) appears on a page under docs/results/, and each bullet names the command and the date."""
    section = _measured_section((ROOT / "README.md").read_text())
    results = "\n".join(page.read_text() for page in sorted((ROOT / "docs" / "results").glob("*.md")))
    bullets = section.split("\n- ")[1:]
    assert len(bullets) >= 3
    for bullet in bullets:
        assert re.search(r"\b20\d\d-\d\d-\d\d\b", bullet) and "`benchmarks/" in bullet, bullet[:80]
        assert "](docs/results/" in bullet, bullet[:80]
    prose = re.sub(r"`[^`]*`|\]\([^)]*\)|Qwen2-0\.5B|Llama", " ", section)
    figures = re.findall(r"\b20\d\d-\d\d-\d\d\b|\d+\.\d+|\b\d{2,}\b", prose)
    assert len(figures) > 20
    missing = [f for f in figures if f not in results]
    assert not missing, f"README quotes figures no results page has: {missing}"
