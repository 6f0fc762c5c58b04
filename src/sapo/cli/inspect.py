"""`sapo inspect`: look inside a saved replay buffer.

Shows, for each (prompt, real, rejected) triple, which segment of the real response the EMA model
rewrote and what it wrote instead, plus buffer statistics, in the terminal (ANSI colours) or as a
self-contained HTML page. Useful to check that rejected responses are plausible but worse, that
segments are not mostly identical to the real text, and how often entries are replayed.

Where the segment is, from :func:`sapo.segments.splice_rejected` (``k`` = ``segment_start``,
``L`` = ``segment_length``, the number of sampled tokens kept):

* no EOS in the sample: ``rejected = real[:k] + g + real[k+L:]``, so the rewritten span is
  ``[k, k+L)`` in both responses;
* EOS in the sample: ``rejected = real[:k] + g[:L]`` ends with that EOS and the real suffix is dropped,
  so the span is ``[k, k+L)`` in the rejected response and ``[k, len(real))`` in the real one.

Both cases are told apart by ``len(rejected) == k + L`` (when they coincide the spans are identical).
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from sapo.buffer import ReplayBuffer, ReplayEntry
from sapo.errors import UsageError
from sapo.run.paths import BUFFER_FILE_GLOB, BUFFER_FILE_RE, CHECKPOINT_RE, STATE_DIR, buffer_file

__all__ = [
    "buffer_statistics",
    "default_tokenizer_dirs",
    "find_buffer_file",
    "load_entries",
    "main",
    "render_html",
    "render_terminal",
    "replaced_span",
    "split_text",
]

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")

# Real response's replaced segment: black on green; rejected response's new segment: white on red.
REAL_ON = "\x1b[30;42m"
REJECTED_ON = "\x1b[97;41m"
BOLD = "\x1b[1m"
OFF = "\x1b[0m"
PLAIN_OPEN, PLAIN_CLOSE = "[[", "]]"

# C0 controls except tab/newline, DEL and C1 controls: shown as \xNN so a generated ESC cannot drive the
# terminal and the HTML stays valid.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


# ------------------------------------------------------------------------------------------------
# Locating and loading
# ------------------------------------------------------------------------------------------------


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The `checkpoint-N` directory with the largest N that holds SAPO state, or None."""
    found = []
    for child in run_dir.iterdir():
        match = CHECKPOINT_RE.fullmatch(child.name)
        if match and (child / STATE_DIR).is_dir():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def _state_dir(directory: Path) -> Path:
    """The sapo_state directory for a run, checkpoint or sapo_state directory."""
    if directory.name == STATE_DIR or any(directory.glob(BUFFER_FILE_GLOB)):
        return directory
    if (directory / STATE_DIR).is_dir():
        return directory / STATE_DIR
    checkpoint = latest_checkpoint(directory)
    if checkpoint is None:
        raise FileNotFoundError(
            f"{directory}: found no replay buffer; expected a run directory with checkpoint-N/{STATE_DIR}/, "
            f"a checkpoint directory, a {STATE_DIR}/ directory or a replay_buffer_rank<R>.safetensors file "
            "(checkpoints are written every save_steps; a run with save_strategy 'no' has none)"
        )
    return checkpoint / STATE_DIR


def find_buffer_file(path: str | os.PathLike[str], rank: int = 0) -> Path:
    """Resolve a run dir (latest checkpoint), checkpoint dir, sapo_state dir or buffer file to the buffer file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    state = _state_dir(path)
    file = state / buffer_file(rank)
    if not file.is_file():
        ranks = sorted(int(m.group(1)) for f in state.glob(BUFFER_FILE_GLOB)
                       if (m := BUFFER_FILE_RE.fullmatch(f.name)))
        present = f" (ranks present: {', '.join(map(str, ranks))})" if ranks else " (no replay buffer files there)"
        raise FileNotFoundError(f"{state}: no replay buffer for rank {rank}{present}")
    return file


def load_entries(path: str | os.PathLike[str], rank: int = 0) -> list[ReplayEntry]:
    """Entries (oldest first, with their sample counts) of the replay buffer found at ``path``.

    ``path`` is a run directory (its latest ``checkpoint-N/sapo_state`` is used), a checkpoint directory,
    a ``sapo_state`` directory or a ``replay_buffer_rank<R>.safetensors`` file; directories give rank
    ``rank``'s buffer (each process keeps its own).
    """
    file = find_buffer_file(path, rank)
    try:
        buffer = ReplayBuffer.load(file)
    except Exception as error:  # safetensors raises its own error type for a corrupt file
        raise ValueError(f"{file}: not a readable SAPO replay buffer ({error})") from error
    return buffer.entries()


def default_tokenizer_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """Directories that may hold the run's tokenizer, most specific first.

    A run directory's output_dir holds the final tokenizer; a checkpoint directory holds the one the
    Trainer saved with it. For a run directory the run dir comes first, otherwise the checkpoint dir.
    """
    path = Path(path)
    state = path.parent if path.is_file() else _state_dir(path)
    checkpoint = state.parent if state.name == STATE_DIR else state
    if path.is_dir() and path not in (state, checkpoint):  # a run directory
        return [path, checkpoint]
    return [checkpoint, checkpoint.parent]


def _find_tokenizer_dir(path: Path) -> Path | None:
    for directory in default_tokenizer_dirs(path):
        if any((directory / name).is_file() for name in _TOKENIZER_FILES):
            return directory
    return None


# ------------------------------------------------------------------------------------------------
# Spans, text and statistics
# ------------------------------------------------------------------------------------------------


def replaced_span(entry: ReplayEntry, response: Literal["rejected", "real"] = "rejected") -> tuple[int, int]:
    """``(start, end)`` token positions of the rewritten segment in the rejected (default) or real response.

    In the rejected response it is the sampled segment ``[k, k+L)``. In the real response it is the text
    that segment replaced: ``[k, k+L)`` when the real suffix was spliced back, ``[k, len(real))`` when the
    sample ended with EOS and the rejected response stops there.
    """
    k, length = entry.segment_start, entry.segment_length
    if k < 0 or length < 0 or k + length > len(entry.rejected) or k > len(entry.real):
        raise ValueError(
            f"inconsistent entry: segment [{k}, {k + length}) with {len(entry.real)} real and "
            f"{len(entry.rejected)} rejected tokens"
        )
    if response == "rejected":
        return k, k + length
    if response == "real":
        ends_in_segment = len(entry.rejected) == k + length
        return k, len(entry.real) if ends_in_segment else min(k + length, len(entry.real))
    raise ValueError(f"response must be 'rejected' or 'real', got {response!r}")


def _decode(tokenizer: Any, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def split_text(tokenizer: Any, tokens: Sequence[int], start: int, end: int) -> tuple[str, str, str]:
    """Text of ``tokens[:start]``, ``tokens[start:end]`` and ``tokens[end:]``, cut at exact token boundaries.

    Prefixes are decoded whole and differenced, so a token's leading space (SentencePiece "▁", byte-level
    "Ġ") stays with its token; where a boundary splits a multi-byte character, and the prefix decodes
    differently, each span is decoded on its own instead.
    """
    head = _decode(tokenizer, tokens[:start])
    upto = _decode(tokenizer, tokens[:end])
    full = _decode(tokenizer, tokens)
    if upto.startswith(head) and full.startswith(upto):
        return head, upto[len(head):], full[len(upto):]
    return head, _decode(tokenizer, tokens[start:end]), _decode(tokenizer, tokens[end:])


def _visible(text: str) -> str:
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def buffer_statistics(entries: Sequence[ReplayEntry]) -> dict[str, float]:
    """Size, sample counts, replaced-segment length and the share of degenerate entries."""
    n = len(entries)
    if n == 0:
        return {"size": 0.0, "mean_times_sampled": 0.0, "max_times_sampled": 0.0, "mean_segment_start": 0.0,
                "mean_replaced_length": 0.0, "identical_fraction": 0.0, "no_suffix_fraction": 0.0}
    return {
        "size": float(n),
        "mean_times_sampled": sum(e.times_sampled for e in entries) / n,
        "max_times_sampled": float(max(e.times_sampled for e in entries)),
        "mean_segment_start": sum(e.segment_start for e in entries) / n,
        "mean_replaced_length": sum(e.segment_length for e in entries) / n,
        # A rejected response equal to the real one gives no preference signal.
        "identical_fraction": sum(e.rejected == e.real for e in entries) / n,
        # The rejected response ends with the segment: the sample hit EOS, or the segment ran to the end.
        "no_suffix_fraction": sum(len(e.rejected) == e.segment_start + e.segment_length
                                        for e in entries) / n,
    }


_STAT_LABELS = (
    ("size", "entries", "{:.0f}"),
    ("mean_times_sampled", "mean times sampled", "{:.2f}"),
    ("max_times_sampled", "max times sampled", "{:.0f}"),
    ("mean_segment_start", "mean segment start (tokens)", "{:.1f}"),
    ("mean_replaced_length", "mean replaced length (tokens)", "{:.1f}"),
    ("identical_fraction", "rejected identical to real", "{:.1%}"),
    ("no_suffix_fraction", "rejected keeps no real text after the segment", "{:.1%}"),
)


def _stat_rows(entries: Sequence[ReplayEntry]) -> list[tuple[str, str]]:
    stats = buffer_statistics(entries)
    return [(label, fmt.format(stats[key])) for key, label, fmt in _STAT_LABELS]


def _entry_texts(entry: ReplayEntry, tokenizer: Any) -> dict[str, Any]:
    real_start, real_end = replaced_span(entry, "real")
    rej_start, rej_end = replaced_span(entry, "rejected")
    return {
        "prompt": _decode(tokenizer, entry.prompt),
        "real": split_text(tokenizer, entry.real, real_start, real_end),
        "rejected": split_text(tokenizer, entry.rejected, rej_start, rej_end),
    }


def _entry_meta(index: int, entry: ReplayEntry) -> str:
    start, end = replaced_span(entry, "real")
    return (f"entry {index}: segment at token {entry.segment_start}, {entry.segment_length} new tokens "
            f"replace {end - start} real tokens, times sampled {entry.times_sampled}"
            + (", identical to the real response" if entry.rejected == entry.real else ""))


def _selected(entries: Sequence[ReplayEntry], limit: int, newest_first: bool) -> list[tuple[int, ReplayEntry]]:
    """(buffer index, entry) of the entries to show: the first ``limit``, or the last ``limit`` newest first."""
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    indexed = list(enumerate(entries))
    return indexed[::-1][:limit] if newest_first else indexed[:limit]


def _order(newest_first: bool) -> str:
    return "newest first" if newest_first else "oldest first"


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def render_terminal(entries: Sequence[ReplayEntry], tokenizer: Any, limit: int = 5, color: bool = True, *,
                    newest_first: bool = False) -> str:
    """Statistics over all ``entries``, then the first ``limit`` entries with the segment highlighted.

    ``entries`` are in buffer order (oldest first, as :func:`load_entries` returns them); with
    ``newest_first`` the last ``limit`` are shown, newest first. Entries are labelled by buffer index.

    With ``color`` the real response's replaced segment is black on green (:data:`REAL_ON`) and the
    rejected response's new segment white on red (:data:`REJECTED_ON`), each closed by :data:`OFF`;
    without it both are wrapped in ``[[`` ... ``]]``.
    """
    bold, off = (BOLD, OFF) if color else ("", "")

    def mark(text: str, on: str) -> str:
        return f"{on}{text}{OFF}" if color else f"{PLAIN_OPEN}{text}{PLAIN_CLOSE}"

    shown = _selected(entries, limit, newest_first)
    lines = [f"{bold}SAPO replay buffer{off}"]
    lines += [f"  {label}: {value}" for label, value in _stat_rows(entries)]
    legend = (f"{mark('replaced', REAL_ON)} = real segment that was rewritten, "
              f"{mark('new', REJECTED_ON)} = the EMA model's segment")
    lines += ["", f"showing {len(shown)} of {len(entries)} entries ({_order(newest_first)}); {legend}"]
    for index, entry in shown:
        texts = _entry_texts(entry, tokenizer)
        real_head, real_mid, real_tail = (_visible(t) for t in texts["real"])
        rej_head, rej_mid, rej_tail = (_visible(t) for t in texts["rejected"])
        lines += [
            "",
            f"{bold}── {_entry_meta(index, entry)}{off}",
            f"{bold}prompt:{off}",
            _visible(texts["prompt"]),
            f"{bold}real:{off}",
            real_head + mark(real_mid, REAL_ON) + real_tail,
            f"{bold}rejected:{off}",
            rej_head + mark(rej_mid, REJECTED_ON) + rej_tail,
        ]
    return "\n".join(lines) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em; color: #222; }
table.stats { border-collapse: collapse; margin-bottom: 1.5em; }
table.stats th, table.stats td { text-align: left; padding: 0.2em 1em 0.2em 0; }
section.entry { border-top: 1px solid #ccc; padding-top: 0.5em; margin-top: 1em; }
h3 { font-size: 0.95em; margin: 0.8em 0 0.2em; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f6f6; padding: 0.6em; margin: 0; }
mark.real { background: #b7e4b7; }
mark.rejected { background: #f4b6b6; }
.meta { color: #555; margin: 0.2em 0; }
""".strip()


def render_html(entries: Sequence[ReplayEntry], tokenizer: Any, limit: int = 5, *,
                title: str = "SAPO replay buffer", newest_first: bool = False) -> str:
    """A self-contained HTML5 page: statistics, then the first ``limit`` entries with ``<mark>`` segments.

    The real response's replaced segment is ``<mark class="real">``, the rejected response's new one
    ``<mark class="rejected">``; every piece of text is escaped.
    """

    def text(value: str) -> str:
        return html.escape(_visible(value), quote=True)

    shown = _selected(entries, limit, newest_first)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{text(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        f"<h1>{text(title)}</h1>",
        '<table class="stats">',
    ]
    parts += [f"<tr><th>{text(label)}</th><td>{text(value)}</td></tr>" for label, value in _stat_rows(entries)]
    parts += [
        "</table>",
        f"<p>Showing {len(shown)} of {len(entries)} entries ({_order(newest_first)}). "
        '<mark class="real">Green</mark>: the segment of the real response that was rewritten; '
        '<mark class="rejected">red</mark>: what the EMA model wrote instead.</p>',
    ]
    for index, entry in shown:
        texts = _entry_texts(entry, tokenizer)
        real_head, real_mid, real_tail = texts["real"]
        rej_head, rej_mid, rej_tail = texts["rejected"]
        parts += [
            f'<section class="entry" id="entry-{index}">',
            f"<h2>Entry {index}</h2>",
            f'<p class="meta">{text(_entry_meta(index, entry))}</p>',
            "<h3>Prompt</h3>",
            f'<pre class="prompt">{text(texts["prompt"])}</pre>',
            "<h3>Real response</h3>",
            f'<pre class="real">{text(real_head)}<mark class="real">{text(real_mid)}</mark>{text(real_tail)}</pre>',
            "<h3>Rejected response</h3>",
            f'<pre class="rejected">{text(rej_head)}<mark class="rejected">{text(rej_mid)}</mark>'
            f"{text(rej_tail)}</pre>",
            "</section>",
        ]
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sapo inspect",
        description="Show replay-buffer entries of a SAPO run: prompt, real and rejected response with the "
        "rewritten segment highlighted, plus buffer statistics.",
    )
    parser.add_argument("path", help="run directory (latest checkpoint-N is used), checkpoint directory, "
                        "sapo_state directory or replay_buffer_rank<R>.safetensors file")
    parser.add_argument("--limit", type=_non_negative, default=5,
                        help="entries to show (default 5; 0: statistics only)")
    parser.add_argument("--newest", action="store_true", help="show the newest entries instead of the oldest")
    parser.add_argument("--rank", type=_non_negative, default=0, help="process whose buffer to read (default 0)")
    parser.add_argument("--html", type=Path, default=None, metavar="FILE", help="write an HTML page to FILE")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer directory or hub id (default: the run or checkpoint directory)")
    parser.add_argument("--no-color", action="store_true",
                        help="mark segments with [[ ]] instead of colours (also when output is not a terminal "
                        "or NO_COLOR is set)")
    return parser


def _load_tokenizer(name: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name))


def main(argv: Sequence[str] | None = None) -> int:

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.html is not None:  # checked before the buffer and tokenizer are loaded
        if args.html.is_dir():
            raise UsageError(f"--html {args.html}: is a directory; name a file for the page")
        existing = args.html.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"--html {args.html}: cannot be created, {existing} is a file")
    try:
        entries = load_entries(args.path, rank=args.rank)
        tokenizer_dir = args.tokenizer or _find_tokenizer_dir(Path(args.path))
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    if tokenizer_dir is None:
        searched = " or ".join(str(d) for d in default_tokenizer_dirs(args.path))
        raise UsageError(f"no tokenizer found in {searched}; pass --tokenizer DIR")
    try:
        tokenizer = _load_tokenizer(tokenizer_dir)
    except (OSError, ValueError) as error:
        raise UsageError(f"could not load the tokenizer from {tokenizer_dir}: {error}") from None
    if args.html is not None:
        page = render_html(entries, tokenizer, args.limit, title=f"SAPO replay buffer: {args.path}",
                           newest_first=args.newest)
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(page, encoding="utf-8")
        print(f"sapo inspect: wrote {args.html} ({min(args.limit, len(entries))} of {len(entries)} entries)")
        return 0
    color = not args.no_color and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    sys.stdout.write(render_terminal(entries, tokenizer, args.limit, color=color, newest_first=args.newest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
