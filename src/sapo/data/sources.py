"""Reading records from their source (a .jsonl/.json/.parquet file, a directory of them, a saved dataset or a
Hub dataset) and loading them as `Example`s, with every bad record named by its location."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from sapo.data.records import Example, RawRecord, check_one_format, normalize_record
from sapo.errors import DataError, describe_unusable_path

logger = logging.getLogger(__name__)

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval", "heldout")


# Reading sources
# ------------------------------------------------------------------------------------------------


def read_records(source: str | os.PathLike, split: str = "train") -> list[RawRecord]:
    """Read every record of a file, a local dataset directory or a hub dataset, keeping locations."""
    path = Path(source)
    unusable = describe_unusable_path(path)
    if unusable:
        raise DataError(f"{source}: {unusable}, not a data file or directory")
    if path.is_file():
        return list(_read_file(path))
    if path.is_dir():
        return _read_directory(path, split)
    if str(source).endswith(DATA_FILE_SUFFIXES) or os.sep in str(source) and not _looks_like_hub_id(str(source)):
        raise DataError(f"{source}: no such file or directory")
    reason = hub_unreachable(str(source), "dataset")
    if reason:
        raise DataError(f"{source}: no such file or directory, and as a hub dataset: {reason}")
    return _read_hub_dataset(str(source), split)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/"))


def hub_unreachable(repo_id: str, repo_type: str = "model", timeout: float = 3.0) -> str | None:
    """Why `repo_id` cannot come from the Hugging Face hub right now, or None when it may: it is in the local cache,
    or the hub's host answers. Without this an offline machine spends about half a minute in retries per file before
    the library gives up. With HF_HUB_OFFLINE set, or behind a proxy, the library decides (it fails fast offline)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    cached = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if cached.is_dir():
        return None
    if constants.HF_HUB_OFFLINE:  # `datasets` also keeps its own cache: let it answer (offline, it does so at once)
        return "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" if repo_type == "model" else None
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return None
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        return f"not in the local Hugging Face cache, and {endpoint.hostname} cannot be reached ({reason})"


def _read_file(path: Path) -> Iterator[RawRecord]:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(DATA_FILE_SUFFIXES)}")


def _read_jsonl(path: Path) -> Iterator[RawRecord]:
    found = False
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            location = f"{path}:{line_number}"
            try:
                # utf-8-sig on the first line: editors on Windows often start files with a byte-order mark
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                found = True
                yield RawRecord(None, location, f"{location}: not valid UTF-8 (byte {error.start} of the line)")
                continue
            if not text.strip():
                continue
            found = True
            try:
                yield RawRecord(json.loads(text), location)
            except (ValueError, RecursionError) as error:
                yield RawRecord(None, location, f"{location}: invalid JSON ({_json_problem(error)})")
    if not found:
        raise DataError(f"{path}: the file has no records")


def _read_json(path: Path) -> Iterator[RawRecord]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {error.start} of the file)") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON Lines stored with a .json suffix
            yield from _read_jsonl(path)
            return
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    except (ValueError, RecursionError) as error:
        raise DataError(f"{path}: invalid JSON ({_json_problem(error)})") from None
    if isinstance(document, Mapping) and isinstance(document.get("data"), list):
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(f"{path}: expected a JSON array of records (or an object with a 'data' array)")
    if not document:
        raise DataError(f"{path}: the file has no records")
    for index, record in enumerate(document):
        yield RawRecord(record, f"{path}: record {index}")


def _json_problem(error: Exception) -> str:
    """What `json.loads` objected to, in words: syntax (with the column), nesting too deep for Python's parser, or an
    integer longer than Python converts (both raise other exceptions than JSONDecodeError)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at column {error.colno}"
    if isinstance(error, RecursionError):
        return "arrays or objects nested too deeply to parse"
    if "digits" in str(error):
        return f"an integer with more digits than Python converts ({sys.get_int_max_str_digits()})"
    return " ".join(str(error).split())


def _read_parquet(path: Path) -> Iterator[RawRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: cannot read as Parquet ({error})") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: the file has no records")
    for index, record in enumerate(table.to_pylist()):
        yield RawRecord(record, f"{path}: row {index}")


def _read_directory(path: Path, split: str) -> list[RawRecord]:
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return _read_saved_dataset(path, split)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_FILE_SUFFIXES)
    preferred = [p for p in files if p.stem.startswith(split)]
    split_named = [p for p in files if p.stem.startswith(SPLIT_NAMES)]
    if not preferred and split_named:  # files are named by split, just not this one: never train on another split
        raise DataError(f"{path}: no data file for split {split!r} (found {', '.join(p.name for p in split_named)})")
    chosen = preferred or files
    if not chosen:
        raise DataError(
            f"{path}: directory holds no dataset (no {', '.join(DATA_FILE_SUFFIXES)} files and no "
            "datasets.save_to_disk output)"
        )
    records: list[RawRecord] = []
    for file in chosen:
        records.extend(_read_file(file))
    return records


def _read_saved_dataset(path: Path, split: str) -> list[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # corrupt, partial or empty save_to_disk output fails deep inside datasets
        raise DataError(f"{path}: cannot load the dataset saved there ({type(error).__name__}: {error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; available: {', '.join(loaded)}")
        loaded = loaded[split]
    if len(loaded) == 0:
        raise DataError(f"{path}: the saved dataset has no records")
    return [RawRecord(record, f"{path}: row {index}") for index, record in enumerate(loaded)]


def _read_hub_dataset(name: str, split: str) -> list[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as error:  # hub/network/format errors come in many types
        raise DataError(f"{name}: cannot load dataset (not a local file or directory; hub said: {error})") from None
    return [RawRecord(record, f"{name}[{split}] row {index}") for index, record in enumerate(loaded)]


# ------------------------------------------------------------------------------------------------


def load_examples(source: str | os.PathLike, split: str = "train", *, skip_invalid: bool = False,
                  with_rejected: bool = False) -> list[Example]:
    """Read and normalise every record of `source` (file, directory or hub dataset name).

    The first invalid record raises `DataError`; with `skip_invalid` invalid records are dropped and
    counted in a warning instead (with the first few reasons), and only an all-invalid source fails.
    """
    return _normalise_all(read_records(source, split), skip_invalid, str(source), with_rejected)


def examples_from_records(records: Iterable[Any], origin: str = "train_dataset", *,
                          skip_invalid: bool = False, with_rejected: bool = False) -> list[Example]:
    """Normalise in-memory records (a list of dicts or a `datasets.Dataset`).

    `Example`s (what `load_examples` returns) pass through unchanged, so data read by the CLI is read and
    normalised once and its errors keep naming the file and line.
    """
    if isinstance(records, Sequence) and records and all(isinstance(r, Example) for r in records):
        return _checked_examples(records, with_rejected)
    if _is_dataset_dict(records):
        raise DataError(f"{origin}: a DatasetDict with splits {', '.join(map(repr, records))}; pass one split, "
                        f"e.g. dataset[{next(iter(records))!r}] (load_dataset(..., split=...))")
    raws = (RawRecord(record, f"{origin}: row {index}") for index, record in enumerate(records))
    return _normalise_all(raws, skip_invalid, origin, with_rejected)


def _is_dataset_dict(records: Any) -> bool:
    """A `datasets.DatasetDict` (a forgotten `split=`): iterating it yields split names, not records."""
    return isinstance(records, Mapping) and bool(records) and all(
        hasattr(split, "column_names") for split in records.values())


def _checked_examples(examples: Sequence[Example], with_rejected: bool) -> list[Example]:
    if with_rejected:
        unpaired = next((e for e in examples if e.rejected is None), None)
        if unpaired is not None:
            raise DataError(f"{unpaired.location or 'an example'}: field 'rejected' is missing (offline preference "
                            "recipes need pairs; load the data with with_rejected=True)")
    check_one_format(examples, "train_dataset")
    return list(examples)


def _normalise_all(raws: Iterable[RawRecord], skip_invalid: bool, origin: str,
                   with_rejected: bool = False) -> list[Example]:
    examples: list[Example] = []
    problems: list[str] = []
    for raw in raws:
        try:
            if raw.error is not None:
                raise DataError(raw.error)
            examples.append(dataclasses.replace(normalize_record(raw.data, raw.location, with_rejected),
                                                record=raw.data))
        except DataError as error:
            if not skip_invalid:
                raise
            problems.append(str(error))
    if problems:
        logger.warning("skip_invalid: dropped %d invalid record(s) of %s, kept %d; first: %s", len(problems),
                       origin, len(examples), " | ".join(problems[:3]))
        if not examples:
            raise DataError(f"{origin}: every record is invalid ({len(problems)}); first: {problems[0]}")
    check_one_format(examples, origin)
    return examples


# ------------------------------------------------------------------------------------------------
