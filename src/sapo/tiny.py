"""Old import path, kept for one release: now `sapo.demo_kit.tiny`."""

from __future__ import annotations

from sapo.demo_kit.tiny import (  # noqa: F401
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    UNK_TOKEN,
    build_model,
    build_tokenizer,
    save_pair,
)
