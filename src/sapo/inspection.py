"""Old import path, kept for one release: now `sapo.cli.inspect`."""

from __future__ import annotations

from sapo.cli.inspect import (  # noqa: F401
    BOLD,
    OFF,
    REAL_ON,
    REJECTED_ON,
    buffer_statistics,
    build_parser,
    default_tokenizer_dirs,
    find_buffer_file,
    latest_checkpoint,
    load_entries,
    main,
    render_html,
    render_terminal,
    replaced_span,
    split_text,
)
