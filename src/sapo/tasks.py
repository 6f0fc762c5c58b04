"""Old import path, kept for one release: now `sapo.demo_kit.tasks` and `sapo.demo_kit.task_judges`."""

from __future__ import annotations

from sapo.demo_kit.task_judges import (  # noqa: F401
    judge,
    score_responses,
)
from sapo.demo_kit.tasks import (  # noqa: F401
    ALL_FAMILIES,
    CONSTRAINT_KINDS,
    DEV_PERCENT,
    FILLER_WORDS,
    FORMAT_ENDINGS,
    HELDOUT_PERCENT,
    LIST_WORDS,
    LISTING_KINDS,
    PARTIAL_CREDIT,
    PROFILE_FIELDS,
    PROFILE_NAMES,
    SPLITS,
    STRING_KINDS,
    STRUCTURED_FAMILIES,
    TASK_FAMILIES,
    TOPICS,
    Draw,
    Record,
    make_records,
    make_suite,
    prompt_of,
    split_of,
)
