"""Data at the scale users have: read, check and tokenize 200k chat records the way `sapo train` does.

    python benchmarks/tokenize_scale.py                                # 200k records, Qwen2 ChatML tokenizer
    python benchmarks/tokenize_scale.py --tokenizer llama3-instruct    # Llama-3's tiktoken BPE and template
    python benchmarks/tokenize_scale.py --records 2000                 # a quick look
    python benchmarks/tokenize_scale.py --num_proc 1                   # one process, whatever the core count

The records are synthetic conversations of English-like words (a fixed seed, so every run tokenizes the same
text): a system message in one record of four, one to three user/assistant exchanges, user turns of 10-60 words
and assistant turns of 40-250 words: 80-980 tokens a conversation with Qwen2's tokenizer, 437 on average. They
are written to a JSON Lines file, and the benchmark times the two stages of `sapo train`'s data path on it,
each with sapo's own functions and a real tokenizer built offline by ``tests/real_tokenizers.py``:

* ``read``: `sapo.data.load_examples` (parse every line, check every field, normalise to prompt + response);
* ``tokenize``: `sapo.data.tokenize_examples` (render the chat template, tokenize, split at the prompt boundary,
  apply the length limits), what `SAPOTrainer` runs on the records it is given.

Above `sapo.data.PARALLEL_MIN_EXAMPLES` records sapo tokenizes in one process per CPU core (`datasets.map`); the
result is the same as in one process. The last line is ``tokenize_scale: N records in T s (R records/s)`` over both
stages; a line before it gives each stage in wall-clock and CPU seconds (workers included): wall time depends on
whatever else the machine runs, CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_WORD_LIST = ("the a model answer question data train token loss step value because however first then we you it "
              "is are was can should would with from into over under about between after before each every other "
              "small large new old good better best quick slow simple clear useful example result method reason "
              "number list write read explain compare describe summarise translate compute check return function "
              "class python code error fix test run file line field name path order time year city river country "
              "history science music water light energy people language word sentence paragraph story poem recipe "
              "plan idea")
WORDS = tuple(_WORD_LIST.split())
TOKENIZERS = ("qwen2-chatml", "llama3-instruct", "zephyr")


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + rng.choice(".?!")


def paragraph(rng: random.Random, low: int, high: int) -> str:
    """`low`-`high` words in sentences of 5-20 words, sometimes split into lines as assistants write lists."""
    remaining, parts = rng.randint(low, high), []
    while remaining > 0:
        length = min(remaining, rng.randint(5, 20))
        parts.append(sentence(rng, length))
        remaining -= length
    separator = "\n- " if rng.random() < 0.2 else " "
    return separator.join(parts)


def make_record(rng: random.Random) -> dict[str, Any]:
    messages = [{"role": "system", "content": paragraph(rng, 5, 20)}] if rng.random() < 0.25 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": paragraph(rng, 10, 60)})
        messages.append({"role": "assistant", "content": paragraph(rng, 40, 250)})
    return {"messages": messages}


def write_records(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            handle.write(json.dumps(make_record(rng)) + "\n")


def build_tokenizer(name: str) -> Any:
    """A real tokenizer from the test helpers (built from files inside dev-extra packages; no hub)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import real_tokenizers

    from sapo.data import prepare_tokenizer

    factory = dict(real_tokenizers.REGISTRY)[name]
    return prepare_tokenizer(factory())


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the tokenizing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(step: Callable[[], Any]) -> tuple[Any, float, float]:
    """`step()`, its wall-clock seconds and its CPU seconds."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    result = step()
    return result, time.perf_counter() - start, cpu_seconds() - start_cpu


def run(records: int, tokenizer_name: str, seed: int, max_length: int, max_prompt_length: int,
        num_proc: int | None) -> dict[str, Any]:
    from sapo.data import default_num_proc, load_examples, tokenize_examples

    tokenizer = build_tokenizer(tokenizer_name)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "chats.jsonl"
        write_records(path, records, seed)
        examples, read_s, read_cpu = timed(lambda: load_examples(path))
    tokenized, tokenize_s, tokenize_cpu = timed(lambda: tokenize_examples(
        tokenizer, examples, max_length=max_length, max_prompt_length=max_prompt_length, progress=True,
        num_proc=num_proc))
    tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in tokenized)
    return {"records": records, "tokenizer": tokenizer_name, "read_s": read_s, "tokenize_s": tokenize_s,
            "total_s": read_s + tokenize_s, "read_cpu_s": read_cpu, "tokenize_cpu_s": tokenize_cpu,
            "num_proc": default_num_proc(records) if num_proc is None else num_proc,
            "kept": len(tokenized), "tokens_kept": tokens,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def report(result: dict[str, Any]) -> str:
    count, total = result["records"], result["total_s"]
    return "\n".join([
        f"tokenizer {result['tokenizer']}: {result['kept']} examples kept, {result['tokens_kept']} tokens, "
        f"peak RSS {result['peak_rss_gib']:.1f} GiB",
        f"read {result['read_s']:.1f} s ({count / result['read_s']:.0f} records/s, CPU {result['read_cpu_s']:.1f} s), "
        f"tokenize {result['tokenize_s']:.1f} s ({count / result['tokenize_s']:.0f} records/s, CPU "
        f"{result['tokenize_cpu_s']:.1f} s, {result['num_proc']} process(es))",
        f"tokenize_scale: {count} records in {total:.1f} s ({count / total:.0f} records/s)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="qwen2-chatml")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--max_prompt_length", type=int, default=1024)
    parser.add_argument("--num_proc", type=int, default=None,
                        help="tokenizing processes (default: sapo's own choice, sapo.data.default_num_proc)")
    args = parser.parse_args(argv)
    result = run(args.records, args.tokenizer, args.seed, args.max_length, args.max_prompt_length, args.num_proc)
    print("TOKENIZE_SCALE_RESULT " + json.dumps(result))
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
