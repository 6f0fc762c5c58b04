"""Shared-prefix packing of preference pairs: one row per pair instead of two.

The real and the rejected sequence of a pair share a token prefix: at least the prompt, and for SAPO also the
real response up to the truncation point (`prompt + y[:k]`). Scoring both as separate rows runs that prefix
through the model twice. A packed row is `prefix + real_suffix + rejected_suffix`; with a block attention mask
(rejected-suffix tokens see the prefix and themselves, never the real suffix) and position ids that restart at
`len(prefix)` for the rejected suffix, every token sees exactly the context it has in its own sequence, so the
log-probs are those of the unshared rows.

The layout is built in two parts: `packed_pair_ids` on the host from the ragged token lists (it fixes the packed
width, so nothing on the device has to be synchronised to know it), and `packed_layout` on the device from
lengths alone (position ids, mask, which hidden state predicts which token, where each log-prob goes back).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def common_prefix_length(*sequences: Sequence[int]) -> int:
    """Number of leading tokens all `sequences` share (a pair's shared prefix; also where a conversation's ids stop
    agreeing with its prompt's, in `sapo.data`)."""
    length = 0
    for column in zip(*sequences, strict=False):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def packed_pair_ids(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int,
                    pad_to_multiple_of: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(real, rejected) full token sequences -> packed rows `prefix + real[c:] + rejected[c:]` (right-padded) and
    each pair's shared prefix length `c`."""
    prefixes = [common_prefix_length(real, rejected) for real, rejected in pairs]
    rows = [[*real, *rejected[c:]] for (real, rejected), c in zip(pairs, prefixes, strict=True)]
    width = math.ceil(max(len(row) for row in rows) / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, :len(row)] = torch.tensor(row, dtype=torch.long)
    return input_ids, torch.tensor(prefixes, dtype=torch.long)


@dataclass(frozen=True)
class PackedLayout:
    """How to run and read a batch of packed pair rows (B pairs, packed width P, unshared width W)."""

    position_ids: torch.Tensor  # (B, P): restart at the prefix length for the rejected suffix
    prefix: torch.Tensor  # (B,): shared prefix lengths
    real_end: torch.Tensor  # (B,): where each real suffix ends (the real row's length)
    end: torch.Tensor  # (B,): where each rejected suffix ends (the packed row's length)
    targets: torch.Tensor  # (B, P) bool: packed tokens whose log-prob some row needs
    predecessors: torch.Tensor  # (B, P): the position whose hidden state predicts each packed token
    source: torch.Tensor  # (2B, W-1): for each (row, shifted position) of the unshared layout, its packed token

    @property
    def width(self) -> int:
        return self.position_ids.shape[1]

    def dense_mask(self) -> torch.Tensor:
        """(B, 1, P, P) bool: query i may attend to key j (`pair_attention_mask`)."""
        return pair_attention_mask(self.prefix, self.real_end, self.end, self.width)


def allowed_attention(query: torch.Tensor, key: torch.Tensor, prefix: torch.Tensor, real_end: torch.Tensor,
                      end: torch.Tensor) -> torch.Tensor:
    """Whether the packed row's `query` position may attend to its `key` position (broadcasting tensors): causal
    within `prefix + real suffix`; a rejected-suffix query sees the prefix and the rejected suffix up to itself; a
    padding query sees only itself (a fully masked row would give NaN). The one rule of the dense mask and of
    FlexAttention's block mask (`sapo.pair_attention`)."""
    causal = key <= query
    rejected_query = causal & ((key < prefix) | (key >= real_end))
    return torch.where(query < real_end, causal, torch.where(query < end, rejected_query, query == key))


def pair_attention_mask(prefix: torch.Tensor, real_end: torch.Tensor, end: torch.Tensor, width: int) -> torch.Tensor:
    """(B, 1, width, width) bool, by `allowed_attention`."""
    positions = torch.arange(width, device=prefix.device)
    allowed = allowed_attention(positions[None, :, None], positions[None, None, :], prefix[:, None, None],
                                real_end[:, None, None], end[:, None, None])
    return allowed[:, None]


def packed_layout(packed_width: int, prefix: torch.Tensor, attention_mask: torch.Tensor,
                  loss_mask: torch.Tensor) -> PackedLayout:
    """The packed layout of pairs given as the unshared batch (real rows, then rejected rows; `attention_mask` and
    `loss_mask` (2B, W)) and the pairs' shared prefix lengths `prefix` (B,). Pure tensor ops, no host sync."""
    pairs = prefix.shape[0]
    lengths = attention_mask.sum(-1)
    real_end, rejected_len = lengths[:pairs], lengths[pairs:]
    end = real_end + rejected_len - prefix
    q = torch.arange(packed_width, device=prefix.device)[None, :]
    in_rejected = q >= real_end[:, None]
    position_ids = torch.where(in_rejected, q - real_end[:, None] + prefix[:, None], q)
    # The first rejected-suffix token is predicted from the last prefix position, like the first real-suffix one.
    predecessors = torch.where(q == real_end[:, None], prefix[:, None] - 1, q - 1).clamp(min=0)
    # Token t of a real row sits at packed position t; of a rejected row, at t below the prefix (shared), else
    # after the real suffix.
    t = torch.arange(1, loss_mask.shape[1], device=prefix.device)[None, :]
    rejected_source = torch.where(t < prefix[:, None], t, t - prefix[:, None] + real_end[:, None])
    source = torch.cat([t.expand(pairs, -1), rejected_source]).clamp(max=packed_width - 1)
    scored = loss_mask[:, 1:].bool()
    hits = torch.zeros(pairs, packed_width, dtype=torch.long, device=prefix.device)
    hits.scatter_add_(1, torch.where(scored, source, 0).view(2, pairs, -1).transpose(0, 1).reshape(pairs, -1),
                      scored.long().view(2, pairs, -1).transpose(0, 1).reshape(pairs, -1))
    targets = hits > 0
    targets[:, 0] = False  # position 0 is never predicted (it only received the unscored entries)
    return PackedLayout(position_ids, prefix, real_end, end, targets, predecessors, source)


# -- which models a block mask describes ------------------------------------------------------------------------
# A packed row's block mask replaces the model's own causal mask (transformers returns a given 4-D mask as-is), so
# packing is exact only where every attention layer is plain full-causal attention over the tokens' own positions.
# Windows, chunks and local layers are limits the block mask would drop; ALiBi builds its bias from a 2-D mask.

WINDOW_FIELDS = ("sliding_window", "sliding_window_size", "attention_window_size", "attention_window", "window_size",
                 "local_attention", "local_attention_window_len", "attention_chunk_size", "keep_window_size",
                 "local_attn_chunk_length")
"""Config fields that, set to a number, limit how far back some layer attends (transformers 5.25's configs)."""

LAYER_KIND_FIELDS = ("layer_types", "block_types", "layers_block_type", "attention_layers", "attention_types")
"""Config fields that list each layer's kind."""

FULL_LAYER_KINDS = frozenset({"full_attention", "global", "mlp", "moe"})
"""Layer kinds that are full-causal attention or position-wise (no attention at all)."""


ALIBI_MODEL_TYPES = ("bloom",)
"""Models that always use ALiBi (no config field says so)."""


def _config_tree(config: object) -> list[object]:
    """`config` and the sub-configs it holds (a multimodal model's `text_config`, MPT's `attn_config`)."""
    found, stack = [], [config]
    while stack:
        node = stack.pop()
        if node is None or any(node is seen for seen in found):
            continue
        found.append(node)
        stack.extend(value for value in vars(node).values() if hasattr(value, "to_dict") and hasattr(value, "__dict__"))
    return found


def _layer_kinds(value: object) -> set[str]:
    """Every string in a (possibly nested, as GPT-Neo's `attention_types`) list of layer kinds."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, list | tuple):
        return set().union(*(_layer_kinds(item) for item in value)) if value else set()
    return set()


def limited_attention(config: object) -> str | None:
    """Why some attention of the model `config` describes is not full-causal (a window, a chunk, a local or
    recurrent layer, ALiBi), or None. A packed row's block mask cannot carry such limits, so such models are scored
    as separate rows."""
    for node in _config_tree(config):
        fields = vars(node)
        for name in LAYER_KIND_FIELDS:
            kinds = _layer_kinds(fields.get(name))
            if kinds - FULL_LAYER_KINDS:
                return f"{name} {sorted(kinds)} are not all full attention"
        for name in WINDOW_FIELDS:
            value = fields.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return f"{name}={value} limits attention to a window"
        if (fields.get("alibi") is True or fields.get("position_embedding_type") == "alibi"
                or getattr(node, "model_type", None) in ALIBI_MODEL_TYPES):
            return "ALiBi position biases are built from a 2-D mask"
    return None
