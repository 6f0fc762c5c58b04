"""Regenerate the generated sections of the docs from the code; tests fail when one is stale:
docs/guides/config.md (the option tables, from the dataclasses) and docs/coming-from-trl.md (every TRL field and
what sapo does with it, from `sapo.trl_compat.TRL_FIELDS`)."""

from pathlib import Path

from sapo.cli import config_reference_markdown
from sapo.trl_compat import trl_fields_markdown

DOCS = Path(__file__).parents[1] / "docs"
PAGE = DOCS / "guides" / "config.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
TRL_PAGE = DOCS / "coming-from-trl.md"
TRL_START, TRL_END = "<!-- trl-fields:start -->\n", "<!-- trl-fields:end -->"


def replace_section(page: Path, start: str, end: str, content: str) -> None:
    text = page.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(head + start + content + "\n" + end + tail)


def main() -> None:
    replace_section(PAGE, START, END, config_reference_markdown())
    replace_section(TRL_PAGE, TRL_START, TRL_END, trl_fields_markdown())


if __name__ == "__main__":
    main()
