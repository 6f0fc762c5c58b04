"""Old import path, kept for one release: now `sapo.cli.plot`."""

from __future__ import annotations

from sapo.cli.plot import (  # noqa: F401
    EVAL_PREFIX,
    FIGURES,
    FigureSpec,
    build_parser,
    load_metrics,
    main,
    plot_runs,
)
