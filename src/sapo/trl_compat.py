"""TRL's settings, each classified once: what a TRL 1.16 `DPOConfig`/`ORPOConfig` (and the `ModelConfig` and
`ScriptArguments` of TRL's scripts) means in sapo.

A TRL user's YAML should either run unchanged where the meaning is the same, or be refused with the field's name
and what to use instead, never with a "did you mean" pointing at an unrelated option. `TRL_FIELDS` holds every
field of those classes outside `transformers.TrainingArguments` (which `SAPOConfig` inherits as TRL does), plus
older TRL names users still write (`torch_dtype`, `max_prompt_length`, `rpo_alpha`):

- taken: a `sapo train` option of the same name and meaning;
- mapped: translated into sapo's options (`loss_type: [sigmoid]` -> `loss_type: sigmoid`, `torch_dtype` -> `dtype`);
- refused: no sapo equivalent; the value that means "off" (TRL's default) is accepted and dropped, since it means
  what sapo does, and any other value is an error that says why and what to use.

`translate_options` applies the table to a config file's mapping (`sapo train --config`); `docs/coming-from-trl.md`
shows it (`trl_fields_markdown`, kept current by scripts/update_config_reference.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

TAKEN, MAPPED, REFUSED = "taken", "mapped", "refused"
# TRL classes whose fields the table classifies: (module, class name) as TRL 1.16 exports them
TRL_CLASSES = (("trl", "DPOConfig"), ("trl.experimental.orpo", "ORPOConfig"), ("trl", "ModelConfig"),
               ("trl", "ScriptArguments"))
_NOT_GIVEN = object()


@dataclass(frozen=True)
class TRLField:
    """How sapo reads one TRL field. `note` says what sapo does instead (shown in errors and the docs); `inert` are
    the values of a refused field that mean "off" (accepted, dropped); `translate` turns a mapped field's value into
    sapo options (raising ValueError for a value it cannot take)."""

    kind: str
    note: str = ""
    inert: tuple[Any, ...] = ()
    translate: Callable[[Any], dict[str, Any]] | None = None


def _rename(name: str) -> Callable[[Any], dict[str, Any]]:
    return lambda value: {name: value}


def one_loss_type(value: Any) -> Any:
    """`loss_type` as sapo takes it: TRL 1.16's list of one loss (its default is `["sigmoid"]`) becomes that loss;
    a list of several (TRL mixes them with loss_weights) raises ValueError; anything else is returned as given."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if not isinstance(value, (list, tuple)):
        return value
    raise ValueError(f"sapo trains with one loss, got loss_type {value!r}: TRL's mixes of several losses (with "
                     "loss_weights, e.g. MPO) are not supported beyond RPO's [sigmoid, sft] (a reference loss plus "
                     "the NLL, sapo's nll_weight); give one of sigmoid, ipo, hinge, orpo")


def rpo_mix(values: Mapping[str, Any]) -> dict[str, Any]:
    """TRL 1.16 writes RPO as `loss_type: [sigmoid, sft]` with `loss_weights: [1, w]` (None: all 1): in sapo that is
    `loss_type: sigmoid` with `nll_weight: w` (any reference loss in place of sigmoid). Other values pass as given.
    A first weight other than 1 is refused: scaling the whole loss is not the same run under gradient clipping."""
    losses, weights = values.get("loss_type"), values.get("loss_weights")
    if not (isinstance(losses, (list, tuple)) and len(losses) == 2 and "sft" in losses):
        return dict(values)
    weights = [1.0, 1.0] if weights is None else list(weights)
    if len(weights) != 2 or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise ValueError(f"loss_weights {values.get('loss_weights')!r} must be two numbers for loss_type {losses!r}")
    by_loss = dict(zip(losses, weights, strict=True))
    other = next(loss for loss in losses if loss != "sft")
    if by_loss[other] != 1:
        raise ValueError(f"loss_weights {weights!r}: sapo weighs {other} by 1 and the NLL by nll_weight; give "
                         f"loss_weights with {other} at 1 (e.g. nll_weight {by_loss['sft'] / by_loss[other]:g} for "
                         "the same ratio)")
    result = {k: v for k, v in values.items() if k != "loss_weights"}
    result.update(loss_type=other, nll_weight=by_loss["sft"])
    return result


def _one_loss(value: Any) -> dict[str, Any]:
    return {"loss_type": one_loss_type(value)}


def _revision(value: Any) -> dict[str, Any]:
    return {} if value in (None, "main") else {"model_init_kwargs": {"revision": value}}


def _dropped(name: str, reason: str) -> Callable[[Any], dict[str, Any]]:
    """A TRL setting with no effect on what is trained, only on how fast: accepted, logged, dropped."""
    def translate(value: Any) -> dict[str, Any]:
        if value is not None:
            logger.info("TRL's %s %r is ignored: %s", name, value, reason)
        return {}
    return translate


_LOSS_MIX = "sapo trains with one loss_type (sigmoid, ipo, hinge, orpo); TRL's loss mixes and their settings are " \
            "not implemented"
_TR_DPO = "TR-DPO's reference mixing is not implemented; sapo refreshes the reference by copying the EMA model or " \
          "the policy: use ref_update_mode (ema, policy, fixed) and ref_update_steps"
_QUANTIZED = "quantized (bitsandbytes) loading is not supported by sapo train"
_PEFT = "sapo train's LoRA takes use_peft, lora_r, lora_alpha, lora_dropout and lora_target_modules only"

TRL_FIELDS: dict[str, TRLField] = {
    # DPOConfig (TRL 1.16)
    "model_init_kwargs": TRLField(TAKEN, "from_pretrained keyword arguments; a 'torch_dtype' key becomes 'dtype'"),
    "trust_remote_code": TRLField(TAKEN, "a sapo train option; from Python, put it in model_init_kwargs"),
    "router_aux_loss_coef": TRLField(REFUSED, "sapo adds no Mixture-of-Experts load-balancing loss", (None,)),
    "disable_dropout": TRLField(TAKEN),
    "dataset_num_proc": TRLField(MAPPED, "dropped: sapo picks its tokenizing processes itself (one per CPU core "
                                 "from 20,000 examples up)",
                                 translate=_dropped("dataset_num_proc", "sapo picks its tokenizing processes itself")),
    "max_length": TRLField(TAKEN),
    "truncation_mode": TRLField(REFUSED, "sapo keeps the start of each response and cuts its end to fit max_length; "
                                "long prompts follow max_prompt_length and prompt_truncation (left, drop)",
                                ("keep_start",)),
    "padding_free": TRLField(REFUSED, "sapo pads its batches (pair_scoring shared_prefix packs each pair into one "
                             "row)", (False,)),
    "pad_to_multiple_of": TRLField(REFUSED, "sapo pads each batch to its longest row", ("auto", None)),
    "precompute_ref_log_probs": TRLField(REFUSED, "the SAPO reference moves and scores responses made during the "
                                         "run; cache_reference_logps (on by default) remembers its scores of "
                                         "buffered pairs instead", (False,)),
    "precompute_ref_batch_size": TRLField(REFUSED, "see precompute_ref_log_probs; use cache_reference_logps",
                                          (None,)),
    "loss_type": TRLField(MAPPED, "read as that one loss when a list of one; RPO's [sigmoid, sft] (any reference "
                          "loss with sft) as that loss with nll_weight = the sft weight; other mixes are refused",
                          translate=_one_loss),
    "loss_weights": TRLField(REFUSED, _LOSS_MIX + " beyond RPO's [1, w] with loss_type [sigmoid, sft] (nll_weight "
                             "w)", (None, [1.0])),
    "ld_alpha": TRLField(REFUSED, "LD-DPO's length weighting is not implemented", (None,)),
    "f_divergence_type": TRLField(REFUSED, "f-DPO divergences are not implemented (sapo's losses use the reverse "
                                  "KL)", ("reverse_kl",)),
    "f_alpha_divergence_coef": TRLField(REFUSED, "used only with f_divergence_type alpha_divergence, which sapo "
                                        "does not implement", (0.5,)),
    "label_smoothing": TRLField(TAKEN, "conservative DPO on loss_type sigmoid only"),
    "beta": TRLField(TAKEN, "for orpo it is the weight lambda, as in TRL's ORPO"),
    "use_weighting": TRLField(REFUSED, "WPO weighting is not implemented", (False,)),
    "discopop_tau": TRLField(REFUSED, "the discopop loss is not implemented", (0.05,)),
    "activation_offloading": TRLField(REFUSED, "activation offloading is not implemented; use "
                                      "gradient_checkpointing", (False,)),
    "sync_ref_model": TRLField(REFUSED, _TR_DPO, (False,)),
    "ref_model_mixup_alpha": TRLField(REFUSED, _TR_DPO, (0.6,)),
    "ref_model_sync_steps": TRLField(REFUSED, _TR_DPO, (512,)),
    "pad_token": TRLField(REFUSED, "deprecated in TRL: set tokenizer.pad_token and pass the tokenizer as "
                          "processing_class (sapo uses the tokenizer's pad token, else its EOS token)",
                          (None, "<PAD_TOKEN>")),  # TrainingArguments.to_dict() writes any *_token as <NAME>
    # ORPOConfig (trl.experimental.orpo, TRL 1.16) beyond DPOConfig's names
    "max_completion_length": TRLField(REFUSED, "a response gets what its prompt leaves of max_length; bound "
                                      "prompts with max_prompt_length", (None,)),
    "padding_value": TRLField(REFUSED, "sapo pads with the tokenizer's pad token", (None,)),
    "generate_during_eval": TRLField(REFUSED, "use eval_judge: the policy answers every eval prompt and a judge "
                                     "scores the answers", (False,)),
    "is_encoder_decoder": TRLField(REFUSED, "sapo trains causal language models only", (None, False)),
    # ModelConfig (TRL's scripts)
    "model_name_or_path": TRLField(TAKEN),
    "model_revision": TRLField(MAPPED, "read as model_init_kwargs {revision: ...} ('main': the default)",
                               translate=_revision),
    "dtype": TRLField(TAKEN, "sapo's default is auto (the checkpoint's dtype), TRL's scripts' float32"),
    "attn_implementation": TRLField(TAKEN),
    "use_peft": TRLField(TAKEN),
    "lora_r": TRLField(TAKEN),
    "lora_alpha": TRLField(TAKEN),
    "lora_dropout": TRLField(TAKEN),
    "lora_target_modules": TRLField(TAKEN, "default: all linear layers"),
    "lora_target_parameters": TRLField(REFUSED, _PEFT, (None,)),
    "lora_modules_to_save": TRLField(REFUSED, _PEFT, (None,)),
    "lora_task_type": TRLField(REFUSED, "sapo trains causal LMs: its LoRA task type is always CAUSAL_LM",
                               ("CAUSAL_LM",)),
    "use_rslora": TRLField(REFUSED, _PEFT, (False,)),
    "use_dora": TRLField(REFUSED, _PEFT, (False,)),
    "load_in_8bit": TRLField(REFUSED, _QUANTIZED, (False,)),
    "load_in_4bit": TRLField(REFUSED, _QUANTIZED, (False,)),
    "bnb_4bit_quant_type": TRLField(REFUSED, _QUANTIZED, ("nf4",)),
    "use_bnb_nested_quant": TRLField(REFUSED, _QUANTIZED, (False,)),
    "bnb_4bit_quant_storage": TRLField(REFUSED, _QUANTIZED, (None,)),
    # ScriptArguments (TRL's scripts)
    "dataset_name": TRLField(TAKEN, "a hub dataset, or a local file or directory"),
    "dataset_config": TRLField(REFUSED, "sapo loads a dataset without a configuration name; point dataset_name at "
                               "the configuration's files", (None,)),
    "dataset_train_split": TRLField(MAPPED, "read as dataset_split", translate=_rename("dataset_split")),
    "dataset_test_split": TRLField(MAPPED, "read as eval_split (of eval_dataset_name)",
                                   translate=_rename("eval_split")),
    "dataset_streaming": TRLField(REFUSED, "sapo tokenizes the whole dataset before training", (False,)),
    "ignore_bias_buffers": TRLField(REFUSED, "a DDP workaround sapo does not need", (False,)),
    # older TRL names still found in configs
    "torch_dtype": TRLField(MAPPED, "read as dtype (transformers' older name)", translate=_rename("dtype")),
    "max_prompt_length": TRLField(TAKEN, "TRL < 1.0; sapo's default is 512"),
    "rpo_alpha": TRLField(MAPPED, "TRL < 1.0: read as nll_weight, the weight of the real responses' NLL added to "
                          "the loss", translate=lambda value: {} if value is None else {"nll_weight": value}),
}


def refusal(name: str, value: Any = _NOT_GIVEN) -> str:
    """Why a TRL field is not a sapo option, and what to use instead (or its sapo name)."""
    entry = TRL_FIELDS[name]
    shown = "" if value is _NOT_GIVEN else f" {value!r}"
    if entry.kind == REFUSED:
        return f"{name}{shown} is a TRL setting sapo does not take: {entry.note}"
    return f"{name} is TRL's setting, in a config file {entry.note}; as a flag, give sapo's option"


def translate_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """A config file's options with TRL's names and forms turned into sapo's. A
    refused field at a value that means "off" is dropped; any other raises ValueError naming the field, why, and
    what to use. A translation that collides with an option the file also sets is an error naming both."""
    result: dict[str, Any] = {}
    translated: dict[str, str] = {}  # sapo option -> the TRL field that set it
    for key, value in rpo_mix(values).items():
        entry = TRL_FIELDS.get(key) if isinstance(key, str) else None
        if entry is None or entry.kind == TAKEN:  # a taken name sapo lacks is reported as unknown by the caller
            _merge(result, translated, key, value, None)
        elif entry.kind == MAPPED:
            for option, new in entry.translate(value).items():
                _merge(result, translated, option, new, key)
        elif entry.kind == REFUSED and any(_same(value, off) for off in entry.inert):
            continue
        else:
            raise ValueError(refusal(key, value))
    return result


def _same(value: Any, off: Any) -> bool:
    """`value` is the "off" value `off` (False is not 0, None is not an empty string)."""
    if isinstance(off, bool) or off is None or isinstance(value, bool):
        return value is off
    return value == off


def _merge(result: dict[str, Any], translated: dict[str, str], option: str, value: Any, source: str | None) -> None:
    if option not in result:
        result[option] = value
        if source is not None:
            translated[option] = source
        return
    if isinstance(result[option], Mapping) and isinstance(value, Mapping):
        clash = [k for k in value if k in result[option] and result[option][k] != value[k]]
        if not clash:
            result[option] = {**result[option], **value}
            return
    first, second = translated.get(option, option), source or option
    if first == second or result[option] == value:
        result[option] = value
        return
    raise ValueError(f"{first} and {second} both set {option} ({result[option]!r} and {value!r}); keep one")


def trl_fields_markdown() -> str:
    """The table of every classified TRL field, for docs/coming-from-trl.md."""
    lines = ["| TRL field | in sapo | note |", "|---|---|---|"]
    for name in sorted(TRL_FIELDS):
        entry = TRL_FIELDS[name]
        kind = entry.kind
        if entry.kind == REFUSED and entry.inert:
            kind += " (accepted at " + ", ".join(f"`{json.dumps(v)}`" for v in entry.inert) + ")"
        lines.append(f"| `{name}` | {kind} | {entry.note.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)
