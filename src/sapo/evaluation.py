"""Old import path, kept for one release: now `sapo.cli.eval`."""

from __future__ import annotations

from sapo.cli.eval import (  # noqa: F401
    build_parser,
    format_table,
    load_eval_records,
    load_model,
    main,
    suite_families,
)
