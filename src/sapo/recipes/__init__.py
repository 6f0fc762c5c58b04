"""Recipes: where each step's training pairs come from.

Every method the paper compares is the same training step on different pairs, so a recipe is a *pair
source*: it says what it needs (an EMA model, a reference, rejected responses in the data), turns the
incoming batch of demonstrations into the padded batch the loss is computed on, and owns its state and
checkpoint files. The trainer builds one by name and calls it; adding a method is one class in one file of
this package,
registered in `RECIPES` below.

- `SelfAugmented` (sapo, sapo-dpo, sapo-orpo): the EMA model rewrites one segment of each incoming real
  response; the pairs go into a replay buffer, and the step trains on a draw from it (SPEC §1).
- `OfflinePairs` (dpo, orpo): the data's own chosen/rejected pairs.
- `Spin` (spin): whole responses of the frozen previous iterate against the real ones, iteration by iteration.
- `Supervised` (sft): the real responses alone, for NLL.
"""

from __future__ import annotations

from sapo.batching import pad_pair_sequences, pad_pairs, pad_sequences, pair_rows  # noqa: F401  (re-exported)
from sapo.recipes.base import (  # noqa: F401
    Pending,
    Recipe,
    StepServices,
)
from sapo.recipes.offline import (  # noqa: F401
    OfflineORPO,
    OfflinePairs,
    Supervised,
)
from sapo.recipes.self_augmented import (  # noqa: F401
    SapoDPO,
    SapoORPO,
    SelfAugmented,
)
from sapo.recipes.spin import (  # noqa: F401
    SPIN_PAPER_PRESET,
    Spin,
)

RECIPES: dict[str, type[Recipe]] = {recipe.name: recipe for recipe in (
    SelfAugmented, SapoDPO, SapoORPO, Supervised, OfflinePairs, OfflineORPO, Spin)}
"""Every recipe by name; `SAPOConfig.recipe` is one of these."""
