"""Regenerate README.md's config reference from the dataclasses (tests fail when it is stale)."""

from pathlib import Path

from sapo.cli import config_reference_markdown

START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def main() -> None:
    path = Path(__file__).parents[1] / "README.md"
    text = path.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + START + config_reference_markdown() + "\n" + END + tail)


if __name__ == "__main__":
    main()
