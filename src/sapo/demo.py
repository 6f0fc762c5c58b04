"""Old import path, kept for one release: now `sapo.cli.demo`."""

from __future__ import annotations

from sapo.cli.demo import (  # noqa: F401
    DemoSettings,
    held_out_score,
    main,
    print_summary,
    run,
    sft_warmup,
    train_sft_checkpoint,
    write_jsonl,
)
