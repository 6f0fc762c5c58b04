"""Loading, validating and tokenizing demonstration data.

SAPO only needs (prompt, real response) pairs. Users arrive with chat `messages`, with
`prompt`/`completion`, or with preference records whose `chosen` side is the demonstration; all are
normalised to (prompt messages, final assistant message) here, with errors that name the file, the
line and the field, because a traceback from deep inside `datasets` tells a user nothing.

The package: `records` (the types, normalising a record), `implicit` (the prompt of a preference record
without one, split as TRL splits it), `sources` (reading files, directories, saved and Hub
datasets), `templates` (chat templates, preparing and saving tokenizers), `tokenize` (ids, lengths, the dataset
the trainer uses). Every name is re-exported here, so `from sapo.data import load_examples` keeps working.
"""

from __future__ import annotations

from sapo.data.records import (  # noqa: F401
    ROLES,
    Example,
    Message,
    RawRecord,
    TokenizedExample,
    check_one_format,
    format_field,
    normalize_record,
    plain_text_prompt,
    prompt_of_record,
)
from sapo.data.sources import (  # noqa: F401
    DATA_FILE_SUFFIXES,
    SPLIT_NAMES,
    examples_from_records,
    hub_unreachable,
    load_examples,
    read_records,
)
from sapo.data.templates import (  # noqa: F401
    CHATML_TEMPLATE,
    NAMED_CHAT_TEMPLATES,
    check_chat_template,
    has_chat_template,
    keep_legacy_flag,
    prepare_tokenizer,
    renders_with_mistral_common,
    require_chat_template,
    resolve_chat_template,
    save_tokenizer,
)
from sapo.data.tokenize import (  # noqa: F401
    PARALLEL_MIN_EXAMPLES,
    TokenizedDataset,
    TruncationReport,
    chat_ids,
    collate_examples,
    default_num_proc,
    fit_lengths,
    plain_text_ids,
    text_ids,
    tokenize_example,
    tokenize_examples,
    tokenized_dataset,
)
from sapo.errors import DataError  # noqa: F401  (re-exported, as before)
