"""Chat templates and tokenizer preparation: named templates, checking a template before the weights load,
preparing a tokenizer (pad token, template) and saving it with its `legacy` flag kept."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sapo.data.records import Example, format_field
from sapo.errors import DataError, describe_unusable_path

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_CHAT_TEMPLATES = {"chatml": CHATML_TEMPLATE}


# Tokenizer preparation and tokenization
# ------------------------------------------------------------------------------------------------


def resolve_chat_template(value: str | None) -> str | None:
    """Accept a built-in name ('chatml'), a path to a Jinja file, or the template text itself."""
    if value is None:
        return None
    if value in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[value]
    if "{" in value:
        return value
    path = Path(value)
    unusable = describe_unusable_path(path)
    if unusable:
        raise DataError(f"chat_template: {value}: {unusable}, not a template file")
    if not path.is_file():
        raise DataError(f"chat_template: {value!r} is neither a file, a built-in name "
                        f"({', '.join(NAMED_CHAT_TEMPLATES)}) nor a Jinja template")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"chat_template: {value}: not valid UTF-8 (byte {error.start})") from None
    except OSError as error:
        raise DataError(f"chat_template: {value}: cannot read ({error.strerror})") from None


def check_chat_template(template: str, origin: str) -> None:
    """Compile `template` as transformers will, so a Jinja syntax error is reported now, with its line, instead of
    as a traceback from the first `apply_chat_template`."""
    import jinja2

    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # a transformers without this helper: compile with a plain sandbox
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def _compile_jinja_template(text: str) -> Any:
            return ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).from_string(text)
    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as error:
        raise DataError(f"{origin}: Jinja syntax error at line {error.lineno} of the template: {error.message}") \
            from None
    except jinja2.TemplateError as error:
        raise DataError(f"{origin}: the Jinja template does not compile ({error})") from None


def renders_with_mistral_common(tokenizer: Any) -> bool:
    """What `AutoTokenizer` gives for a checkpoint with `tekken.json` when mistral-common is installed: it renders
    chats with mistral-common itself (no Jinja template) and is only safe to use with `tokenize=True`."""
    return type(tokenizer).__name__ == "MistralCommonBackend"


def prepare_tokenizer(tokenizer: Any, chat_template: str | None = None) -> Any:
    """Make a tokenizer usable for SAPO: an EOS token is required, a pad token is set, and a chat template given (or
    the tokenizer's own) is checked. No template is required here: plain-text data needs none (see
    `require_chat_template`, which the data is checked with before any weights load)."""
    template = resolve_chat_template(chat_template)
    if template is not None and renders_with_mistral_common(tokenizer):
        raise DataError("chat_template: this tokenizer (MistralCommonBackend, from tekken.json) renders chats with "
                        "mistral-common and takes no Jinja template; drop --chat_template")
    if template is not None:
        if not template.strip():
            raise DataError("chat_template is empty: it would render every prompt as no tokens")
        check_chat_template(template, "chat_template")
        tokenizer.chat_template = template
    elif isinstance(getattr(tokenizer, "chat_template", None), str):
        if not tokenizer.chat_template.strip():
            source = getattr(tokenizer, "name_or_path", None)
            raise DataError(f"the tokenizer's chat template is empty{f' ({source})' if source else ''}, so every "
                            "prompt would render as no tokens; pass chat_template (CLI: --chat_template)")
        check_chat_template(tokenizer.chat_template, "the tokenizer's own chat template (pass --chat_template to "
                                                     "replace it)")
    which = _tokenizer_name(tokenizer)
    if tokenizer.eos_token_id is None:
        raise DataError(f"{which} has no EOS token: set tokenizer.eos_token (CLI: use a tokenizer that has one, "
                        "e.g. set eos_token in its tokenizer_config.json)")
    if tokenizer.pad_token_id is None:
        logger.warning("tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can render chats: a Jinja template, or mistral-common's own rendering."""
    return getattr(tokenizer, "chat_template", None) is not None or renders_with_mistral_common(tokenizer)


def require_chat_template(tokenizer: Any, examples: Iterable[Example], origin: str = "the data") -> None:
    """Refuse conversational records for a tokenizer without a chat template (a base model's, usually), naming the
    first such record and the field that makes it conversational. Plain-text records need no template. Called on the
    training and eval data as soon as the tokenizer is loaded, before any weights are read."""
    if has_chat_template(tokenizer):
        return
    chat = next((example for example in examples if not example.text), None)
    if chat is None:
        return
    raise DataError(
        f"{chat.location or origin}: the record is conversational (field '{format_field(chat)}' holds chat "
        f"messages) and {_tokenizer_name(tokenizer)} has no chat template to render it: pass --chat_template chatml "
        "(or a Jinja template, or a file holding one; in Python chat_template=...), use a tokenizer that has a "
        "template, or write the data as plain text (string 'prompt' and 'completion' fields, trained as raw text)")


def _tokenizer_name(tokenizer: Any) -> str:
    source = getattr(tokenizer, "name_or_path", None)
    return f"the tokenizer ({source})" if source else "the tokenizer"


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> None:
    """`save_pretrained`, keeping the `legacy` flag that transformers 5 drops from tokenizer_config.json: without it
    a legacy SentencePiece `LlamaTokenizer` (Llama-2/Mistral style) reloads non-legacy and tokenizes text after
    special tokens differently from the model it was trained with."""
    tokenizer.save_pretrained(directory)
    keep_legacy_flag(tokenizer, directory)


def keep_legacy_flag(tokenizer: Any, directory: str | os.PathLike) -> None:
    """Write `tokenizer.legacy` back into a saved tokenizer_config.json (see `save_tokenizer`)."""
    legacy = getattr(tokenizer, "legacy", None)
    config_file = Path(directory) / "tokenizer_config.json"
    if isinstance(legacy, bool) and config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("legacy") != legacy:
            config["legacy"] = legacy
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
