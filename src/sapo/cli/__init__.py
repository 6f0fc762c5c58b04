"""Command line: `sapo train` (YAML config + flags, like TRL's scripts) and `sapo demo`.

Every `SAPOConfig`/`TrainingArguments` field is a flag of the same name, so `--help` documents all of
them and a YAML file may set any of them; flags given on the command line override the file.
Expected failures (bad data, bad config) print one paragraph and exit with status 2; `--debug` shows
the traceback instead.

One module per command: `train` (with its options in `options`), `demo`, `plot`, `inspect`, `eval`; `commands` holds
the `sapo` entry point (`sapo.cli:main`) and the error handling every command shares.
"""

from __future__ import annotations

from sapo.cli.commands import (  # noqa: F401
    changed_trainer_defaults,
    config_reference_markdown,
    main,
    quiet_deepspeed_probe,
    run_demo,
    run_eval,
    run_inspect,
    run_plot,
)
from sapo.cli.options import (  # noqa: F401
    DTYPES,
    EXIT_USAGE,
    FILESYSTEM_ERRNOS,
    ModelArguments,
    apply_lora,
    build_train_parser,
    check_model_arguments,
    known_option_names,
    load_model_and_tokenizer,
    lora_config,
    model_init_kwargs,
    option_types,
    parse_train_args,
    read_yaml_config,
)
from sapo.cli.train import (  # noqa: F401
    EVAL_METRICS,
    SUMMARY_METRICS,
    check_output_location,
    run_summary,
    run_train,
    show_bar_and_summary,
)
from sapo.loading import (  # noqa: F401  (re-exported: these lived here before sapo.loading)
    TOKENIZER_FILES,
    WEIGHT_FILES,
    check_model_source,
    check_tokenizer_source,
)
