"""Regenerate the config reference page (docs/guides/config.md) from the dataclasses; tests fail when it is stale."""

from pathlib import Path

from sapo.cli import config_reference_markdown

PAGE = Path(__file__).parents[1] / "docs" / "guides" / "config.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def main() -> None:
    text = PAGE.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(head + START + config_reference_markdown() + "\n" + END + tail)


if __name__ == "__main__":
    main()
