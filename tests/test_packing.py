import torch

from sapo.packing import common_prefix_length, packed_layout, pair_attention_mask


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([5], [6]) == 0
    assert common_prefix_length([], [1]) == 0


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


def test_packed_layout_positions_predecessors_and_where_each_row_reads():
    # one pair: real = [a b c d e] (prompt a b), rejected = [a b c x y]: prefix 3, packed [a b c d e x y]
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    layout = packed_layout(8, torch.tensor([3]), attention, loss_mask)
    assert layout.position_ids[0, :7].tolist() == [0, 1, 2, 3, 4, 3, 4]
    assert layout.predecessors[0, :7].tolist() == [0, 0, 1, 2, 3, 2, 5]  # x is predicted from c, like d
    assert layout.targets[0].int().tolist() == [0, 0, 1, 1, 1, 1, 1, 0]
    # shifted targets t = 1..4: the real row reads packed 1..4; the rejected row shares c (t = 2), then x y
    assert layout.source[0].tolist() == [1, 2, 3, 4]
    assert layout.source[1, 1:].tolist() == [2, 5, 6]
