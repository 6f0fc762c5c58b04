import torch

from sapo.buffer import ReplayEntry
from sapo.packing import common_prefix_length, pair_attention_mask
from sapo.recipes import pad_pairs


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([5], [6]) == 0
    assert common_prefix_length([], [1]) == 0


def test_pad_pairs_packs_each_pair_around_its_shared_prefix():
    entries = [ReplayEntry([1, 2], [3, 4, 5], [3, 9], 1, 1),  # shares prompt + y[:1]
               ReplayEntry([7], [8], [8], 0, 0),  # rejected == real: everything shared
               ReplayEntry([6], [5], [4, 3], 0, 2)]  # shares the prompt only
    batch = pad_pairs(entries, pad_token_id=0)
    assert batch["prefix_lengths"].tolist() == [3, 2, 1]
    assert batch["packed_input_ids"].shape == (3, 8)
    assert batch["packed_input_ids"][:, :5].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [6, 5, 4, 3, 0]]
    assert batch["packed_input_ids"][0, 5].item() == 9


def test_pair_attention_mask_blocks_the_real_suffix_from_the_rejected_one():
    # prefix 2, real suffix at 2..3, rejected suffix at 4..5, padding at 6..7
    allowed = pair_attention_mask(torch.tensor([2]), torch.tensor([4]), torch.tensor([6]), 8)[0, 0].int()
    assert allowed.tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # rejected suffix: the prefix and itself, causally
        [1, 1, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0],  # padding sees itself only (no fully masked row)
        [0, 0, 0, 0, 0, 0, 0, 1],
    ]
