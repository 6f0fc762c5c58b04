"""The run-directory names that the trainer writes and `plot`/`inspect` read come from one module."""

import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from sapo import layout


def test_checkpoint_names_are_the_ones_transformers_finds(tmp_path):
    """Resuming with `true` relies on transformers' get_last_checkpoint finding what sapo wrote."""
    assert layout.CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR
    for step in (2, 10):
        (tmp_path / f"{layout.CHECKPOINT_PREFIX}-{step}").mkdir()
    assert get_last_checkpoint(str(tmp_path)).endswith("checkpoint-10")
    assert layout.CHECKPOINT_RE.fullmatch("checkpoint-10").group(1) == "10"


def test_per_rank_file_names_are_distinct_and_found_by_the_inspect_pattern():
    names = {layout.buffer_file(0), layout.buffer_file(1), layout.pending_file(0), layout.segment_rng_file(0),
             layout.spin_file(0), layout.copy_file("ema", 0), layout.copy_file("ema", None)}
    assert len(names) == 7
    assert [int(layout.BUFFER_FILE_RE.fullmatch(layout.buffer_file(r)).group(1)) for r in (0, 3)] == [0, 3]
    assert re.fullmatch(layout.BUFFER_FILE_GLOB.replace("*", r"\d+").replace(".", r"\."), layout.buffer_file(12))
