"""Tests for `sapo inspect`: segment spans, highlighting on exact token boundaries, HTML validity, loading."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

from sapo import tiny
from sapo.buffer import ReplayBuffer, ReplayEntry
from sapo.cli import inspect as inspection
from sapo.cli.inspect import (
    OFF,
    REAL_ON,
    REJECTED_ON,
    buffer_statistics,
    default_tokenizer_dirs,
    find_buffer_file,
    load_entries,
    render_html,
    render_terminal,
    replaced_span,
    split_text,
)
from sapo.segments import splice_rejected


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def make_entry(tok, prompt: str, real: str, k: int, sample: str, generation_length: int,
               times_sampled: int = 0) -> ReplayEntry:
    """Entry built with the trainer's own splice, so the spans are tested against the real layout."""
    real_ids = encode(tok, real)
    rejected, kept = splice_rejected(real_ids, k, encode(tok, sample), generation_length, {tok.eos_token_id})
    return ReplayEntry(encode(tok, prompt), real_ids, rejected, k, kept, times_sampled)


@pytest.fixture()
def no_eos(tok) -> ReplayEntry:
    # real "hello world</s>" (12 tokens: </s> is one), "llo" (k=2, G=3) rewritten as "XYZ", suffix kept
    return make_entry(tok, "<s><|user|>greet<|assistant|>", "hello world</s>", 2, "XYZ", 3, times_sampled=2)


@pytest.fixture()
def with_eos(tok) -> ReplayEntry:
    # real "abcdefgh</s>", k=3, G=4: the sample "QR</s>..." ends early, so the real suffix is dropped
    return make_entry(tok, "<s><|user|>letters<|assistant|>", "abcdefgh</s>", 3, "QR</s>zz", 4, times_sampled=5)


# ------------------------------------------------------------------------------------------------ spans


def test_replaced_span_without_eos(tok, no_eos) -> None:
    assert tok.decode(no_eos.rejected) == "heXYZ world</s>"
    assert (no_eos.segment_start, no_eos.segment_length) == (2, 3)
    assert replaced_span(no_eos) == (2, 5)
    assert replaced_span(no_eos, "rejected") == (2, 5)
    assert replaced_span(no_eos, "real") == (2, 5)


def test_replaced_span_with_eos(tok, with_eos) -> None:
    assert tok.decode(with_eos.rejected) == "abcQR</s>"
    assert (with_eos.segment_start, with_eos.segment_length) == (3, 3)  # Q, R, </s>
    assert replaced_span(with_eos) == (3, 6)
    # everything after k in the real response is gone from the rejected one
    assert replaced_span(with_eos, "real") == (3, len(with_eos.real)) == (3, 9)


def test_replaced_span_segment_running_to_the_end(tok) -> None:
    # k=0, G=len(real): no EOS in the sample, nothing after the segment; both readings give the same spans
    entry = make_entry(tok, "p", "ab</s>", 0, "xyz", 3)
    assert tok.decode(entry.rejected) == "xyz"
    assert replaced_span(entry) == (0, 3)
    assert replaced_span(entry, "real") == (0, 3)


def test_replaced_span_rejects_inconsistent_entries() -> None:
    with pytest.raises(ValueError, match="inconsistent entry"):
        replaced_span(ReplayEntry([1], [5, 6, 7], [5, 8], 1, 4))
    with pytest.raises(ValueError, match="response must be"):
        replaced_span(ReplayEntry([1], [5, 6], [5, 8], 1, 1), "chosen")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ text


def test_split_text_cuts_at_token_boundaries(tok, no_eos) -> None:
    assert split_text(tok, no_eos.real, 2, 5) == ("he", "llo", " world</s>")
    assert split_text(tok, no_eos.rejected, 2, 5) == ("he", "XYZ", " world</s>")
    assert split_text(tok, no_eos.real, 0, 0) == ("", "", "hello world</s>")


class _SentencePieceLike:
    """Decodes '▁word' pieces and strips the leading space of the whole text, as SentencePiece does."""

    pieces = ["▁hello", "▁big", "▁world"]

    def decode(self, ids, **kwargs) -> str:
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").lstrip(" ")


class _Bytes:
    """Byte-level decoding where a cut inside a multi-byte character shows U+FFFD."""

    def decode(self, ids, **kwargs) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_split_text_keeps_a_tokens_leading_space() -> None:
    # decoded alone, "▁big" would lose its space; prefix differencing keeps it with its token
    assert split_text(_SentencePieceLike(), [0, 1, 2], 1, 2) == ("hello", " big", " world")


def test_split_text_falls_back_to_spans_inside_a_character() -> None:
    ids = list("é!".encode())  # 0xc3 0xa9 0x21
    assert split_text(_Bytes(), ids, 1, 3) == ("\ufffd", "\ufffd!", "")


# ------------------------------------------------------------------------------------------------ terminal


def test_terminal_highlights_exactly_the_replaced_tokens(tok, no_eos, with_eos) -> None:
    out = render_terminal([no_eos, with_eos], tok, limit=2, color=True)
    lines = out.splitlines()
    assert f"he{REAL_ON}llo{OFF} world</s>" in lines
    assert f"he{REJECTED_ON}XYZ{OFF} world</s>" in lines
    assert f"abc{REAL_ON}defgh</s>{OFF}" in lines
    assert f"abc{REJECTED_ON}QR</s>{OFF}" in lines
    assert "<s><|user|>greet<|assistant|>" in lines
    # one highlight per shown entry and side, plus one of each in the legend
    assert out.count(REAL_ON) == out.count(REJECTED_ON) == 3


def test_terminal_plain_brackets(tok, no_eos, with_eos) -> None:
    out = render_terminal([no_eos, with_eos], tok, limit=5, color=False)
    lines = out.splitlines()
    assert "he[[llo]] world</s>" in lines
    assert "he[[XYZ]] world</s>" in lines
    assert "abc[[defgh</s>]]" in lines
    assert "abc[[QR</s>]]" in lines
    assert "\x1b" not in out


def test_terminal_statistics_and_limit(tok, no_eos, with_eos) -> None:
    identical = ReplayEntry(encode(tok, "p"), encode(tok, "ok</s>"), encode(tok, "ok</s>"), 0, 3, 0)
    entries = [no_eos, with_eos, identical]
    stats = buffer_statistics(entries)
    assert stats["size"] == 3
    assert stats["mean_times_sampled"] == pytest.approx(7 / 3)
    assert stats["max_times_sampled"] == 5
    assert stats["mean_replaced_length"] == pytest.approx((3 + 3 + 3) / 3)
    assert stats["identical_fraction"] == pytest.approx(1 / 3)
    assert stats["no_suffix_fraction"] == pytest.approx(2 / 3)  # the EOS entry and the whole-response one
    assert buffer_statistics([])["size"] == 0

    out = render_terminal(entries, tok, limit=1, color=False)
    assert "entries: 3" in out and "mean times sampled: 2.33" in out and "max times sampled: 5" in out
    assert "mean replaced length (tokens): 3.0" in out and "rejected identical to real: 33.3%" in out
    assert "showing 1 of 3 entries" in out
    assert "entry 0:" in out and "entry 1:" not in out
    newest = render_terminal(entries, tok, limit=1, color=False, newest_first=True)
    assert "entry 2:" in newest and "identical to the real response" in newest and "entry 0:" not in newest
    assert "entry 0:" not in render_terminal(entries, tok, limit=0, color=False)
    with pytest.raises(ValueError, match="limit"):
        render_terminal(entries, tok, limit=-1)


def test_terminal_neutralises_control_characters(tok) -> None:
    # a generated ESC-like control character must not reach the terminal raw (\x0b is in the tiny vocab)
    entry = make_entry(tok, "p", "abcdef</s>", 1, "\x0bZ", 2)
    out = render_terminal([entry], tok, limit=1, color=False)
    assert "a[[\\x0bZ]]def</s>" in out.splitlines()
    assert "\x0b" not in out


# ------------------------------------------------------------------------------------------------ HTML


_VOID = {"meta", "br", "hr", "img", "input", "link", "wbr", "col", "area", "base", "source", "track", "embed"}


class _Checker(HTMLParser):
    """Collects structural errors and the text of each <mark> inside an entry section."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.seen: list[str] = []
        self.doctype: str | None = None
        self.marks: list[list[str]] = []

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag, attrs) -> None:
        self.seen.append(tag)
        if tag in _VOID:
            return
        if tag == "mark" and "section" in self.stack:
            self.marks.append([dict(attrs).get("class") or "", ""])
        self.stack.append(tag)

    def handle_startendtag(self, tag, attrs) -> None:
        self.seen.append(tag)

    def handle_endtag(self, tag) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "mark" and "section" in self.stack:
            self.marks[-1][1] += data


def check_html(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.doctype is not None and checker.doctype.lower() == "doctype html"
    assert not checker.errors, checker.errors
    assert checker.stack == [], f"unclosed tags: {checker.stack}"
    assert checker.seen[:4] == ["html", "head", "meta", "title"]
    assert "body" in checker.seen
    return checker


def test_html_is_valid_and_marks_exactly_the_replaced_text(tok, no_eos, with_eos) -> None:
    page = render_html([no_eos, with_eos], tok, limit=2)
    assert page.startswith("<!DOCTYPE html>\n") and page.rstrip().endswith("</html>")
    assert '<meta charset="utf-8">' in page
    checker = check_html(page)
    assert checker.marks == [["real", "llo"], ["rejected", "XYZ"], ["real", "defgh</s>"], ["rejected", "QR</s>"]]
    assert "&lt;/s&gt;" in page  # special tokens shown, escaped


def test_html_escapes_markup_in_the_text(tok) -> None:
    entry = make_entry(tok, "<script>alert(1)</script>", "a<b>&c</s>", 1, "<i>", 3)
    page = render_html([entry], tok, limit=1, title="run <x> & y")
    checker = check_html(page)
    assert "script" not in checker.seen and "b" not in checker.seen and "i" not in checker.seen
    assert checker.marks == [["real", "<b>"], ["rejected", "<i>"]]
    assert "&lt;script&gt;" in page and "run &lt;x&gt; &amp; y" in page


def test_html_limit_zero_is_statistics_only(tok, no_eos) -> None:
    checker = check_html(render_html([no_eos], tok, limit=0))
    assert checker.marks == [] and "section" not in checker.seen


# ------------------------------------------------------------------------------------------------ loading


def save_buffer(entries: list[ReplayEntry], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = ReplayBuffer(capacity=8, seed=0)
    buffer.extend(entries)
    buffer.save(path)


@pytest.fixture()
def run_dir(tmp_path, no_eos, with_eos) -> Path:
    """checkpoint-5 and checkpoint-12 (latest, though "checkpoint-5" sorts after it as text), two ranks."""
    run = tmp_path / "run"
    save_buffer([no_eos], run / "checkpoint-5" / "sapo_state" / "replay_buffer_rank0.safetensors")
    save_buffer([no_eos, with_eos], run / "checkpoint-12" / "sapo_state" / "replay_buffer_rank0.safetensors")
    save_buffer([with_eos], run / "checkpoint-12" / "sapo_state" / "replay_buffer_rank1.safetensors")
    (run / "checkpoint-20").mkdir()  # no sapo_state: not a SAPO checkpoint, ignored
    (run / "checkpoint-20" / "trainer_state.json").write_text("{}")
    return run


def test_load_entries_from_every_kind_of_path(run_dir, no_eos, with_eos) -> None:
    latest = run_dir / "checkpoint-12"
    buffer_file = latest / "sapo_state" / "replay_buffer_rank0.safetensors"
    for path in (run_dir, latest, latest / "sapo_state", buffer_file, str(run_dir)):
        assert load_entries(path) == [no_eos, with_eos], path
    assert load_entries(run_dir, rank=1) == [with_eos]
    assert load_entries(run_dir / "checkpoint-5") == [no_eos]
    assert load_entries(buffer_file)[1].times_sampled == 5
    assert find_buffer_file(run_dir) == buffer_file


def test_load_entries_errors(run_dir, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no replay buffer for rank 3 \(ranks present: 0, 1\)"):
        load_entries(run_dir, rank=3)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_entries(tmp_path / "missing")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="found no replay buffer"):
        load_entries(tmp_path / "empty_run")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable SAPO replay buffer"):
        load_entries(bad)


def test_default_tokenizer_dirs(run_dir) -> None:
    latest = run_dir / "checkpoint-12"
    assert default_tokenizer_dirs(run_dir) == [run_dir, latest]
    assert default_tokenizer_dirs(latest) == [latest, run_dir]
    assert default_tokenizer_dirs(latest / "sapo_state") == [latest, run_dir]
    assert default_tokenizer_dirs(latest / "sapo_state" / "replay_buffer_rank1.safetensors") == [latest, run_dir]


def test_main_terminal_and_html(run_dir, tok, tmp_path, capsys) -> None:
    tok.save_pretrained(run_dir)  # output_dir holds the tokenizer; the checkpoint here has none
    assert inspection.main([str(run_dir / "checkpoint-12"), "--limit", "1", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert "entries: 2" in out and "he[[llo]] world</s>" in out and "abc[[" not in out

    page = tmp_path / "report" / "buffer.html"
    assert inspection.main([str(run_dir), "--html", str(page), "--newest", "--limit", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    checker = check_html(page.read_text(encoding="utf-8"))
    assert checker.marks == [["real", "defgh</s>"], ["rejected", "QR</s>"]]


def test_main_reports_usage_errors(run_dir, tmp_path) -> None:
    from sapo.errors import UsageError

    with pytest.raises(UsageError, match="no tokenizer found"):
        inspection.main([str(run_dir)])
    with pytest.raises(UsageError, match="no such file"):
        inspection.main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit):
        inspection.main([str(run_dir), "--limit", "-1"])
