"""What every benchmark shares so that a run cut short keeps what it measured, and says how its code compiled.

* `emit(name, record, path)`: one measurement as one JSON line, printed (``RESULT {...}``, flushed) and appended
  to ``path`` (opened, written and closed per line) the moment it is known, so a timeout or a crash later in the
  run loses nothing measured before it.
* `CompileWatch`: from its creation on, how many frames dynamo compiled, how many of those were recompilations
  (dynamo's compile id ``frame/attempt`` with attempt > 0, from `torch._dynamo.callback_handler`), the graph
  breaks (``torch._dynamo.utils.counters["graph_break"]``), and whether CUDA graphs were captured (CUDA-graph
  recordings reported by the same callbacks, ``counters["inductor"]["cudagraph_skips"]``); on a CPU, CUDA graphs
  are simply "not captured: cpu".
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

RESULT_PREFIX = "RESULT "


def _plain(value: Any) -> Any:
    """JSON without NaN/inf (strict parsers reject them): None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def emit(name: str, record: dict[str, Any], path: Path | str | None) -> None:
    """Print and append one measurement now (see the module docstring)."""
    line = json.dumps(_plain({"name": name, **record}), default=str)
    print(RESULT_PREFIX + line, flush=True)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def read_results(path: Path | str) -> list[dict[str, Any]]:
    """Every JSON line of `path` (a line cut by a kill is skipped)."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class CompileWatch:
    """Counts dynamo compilations, recompilations, graph breaks and CUDA-graph recordings from now on."""

    def __init__(self) -> None:
        import torch
        from torch._dynamo.utils import counters

        self._counters = counters
        self._breaks = sum(counters["graph_break"].values())
        self._skips = counters["inductor"]["cudagraph_skips"]
        self.compile_ids: list[str] = []
        self.recordings = 0
        self._active = True
        torch._dynamo.callback_handler.register_end_callback(self._on_end)

    def _on_end(self, args: Any) -> None:
        if not self._active:
            return
        trigger = getattr(args.callback_trigger, "name", str(args.callback_trigger))
        if trigger == "DYNAMO":
            self.compile_ids.append(str(args.compile_id))
        elif trigger == "CUDAGRAPH_RECORDING":
            self.recordings += 1

    def report(self, device: Any, compiled: bool | None, compile_error: str | None = None) -> dict[str, Any]:
        """The figures so far, and a verdict on CUDA graphs; `compiled` says whether the code under watch was meant
        to be compiled (None: unknown), `compile_error` why compiling failed."""
        self._active = False
        recompiles = sum(1 for cid in self.compile_ids if not cid.rstrip("]").endswith("/0"))
        skips = self._counters["inductor"]["cudagraph_skips"] - self._skips
        device_type = getattr(device, "type", str(device).split(":")[0])
        if compile_error:
            graphs = f"not captured: compile failed ({compile_error})"
        elif compiled is False:
            graphs = "not captured: not compiled"
        elif device_type != "cuda":
            graphs = f"not captured: {device_type}"
        elif skips:
            graphs = f"not captured: {skips} cudagraph skips (TORCH_LOGS=perf_hints says why)"
        elif self.recordings:
            graphs = f"captured ({self.recordings} recordings)"
        else:
            graphs = "not captured: nothing recorded"
        return {"dynamo_frames": len(self.compile_ids), "recompiles": recompiles,
                "graph_breaks": sum(self._counters["graph_break"].values()) - self._breaks,
                "cuda_graphs": graphs, "compile_failed": bool(compile_error)}


def compile_cell(report: dict[str, Any] | None) -> str:
    """One table cell: frames / recompiles / graph breaks / CUDA graphs."""
    if not report:
        return "-"
    failed = "COMPILE FAILED; " if report.get("compile_failed") else ""
    return (f"{failed}{report['dynamo_frames']} frames, {report['recompiles']} recompiles, "
            f"{report['graph_breaks']} graph breaks, CUDA graphs {report['cuda_graphs']}")


SUMMARY_KEYS = ("exit_status", "passed", "failed", "error", "skipped", "rows", "step_mean_s", "step_ratio", "cpu_ratio",
                "peak_memory_ratio", "tokens_per_s", "first_call_s", "peak_mib", "memory_kind", "copies_device_bytes",
                "engine", "generation_tokens_per_s", "full_round_s", "steady_round_s", "ratio_to_separate",
                "max_logp_difference")


def summary_line(row: dict[str, Any]) -> str:
    """One row of the summary: the measurement's name, its headline figures, how it compiled."""
    cells = []
    for key in SUMMARY_KEYS:
        if row.get(key) is not None:
            value = row[key]
            cells.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    compiled = f" | {compile_cell(row['compile'])}" if row.get("compile") else ""
    return f"{row.get('name', '?'):<22} " + ", ".join(cells) + compiled


def pytest_counts(log: str) -> dict[str, int]:
    """Outcome counts of pytest's last summary line in `log` ("3 passed, 1 skipped in 2.0s"); {} if none."""
    import re

    for line in reversed(log.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b", line)
        if found and re.search(r" in [\d.]+s", line):
            return {("error" if kind.startswith("error") else kind): int(count) for count, kind in found}
    return {}


def main(argv: list[str]) -> int:
    """`python benchmarks/benchlog.py results.jsonl`: every row, one line each (gpu_check.sh's summary);
    `python benchmarks/benchlog.py --pytest NAME LOG STATUS results.jsonl`: a test part's counts as one row."""
    if len(argv) == 5 and argv[0] == "--pytest":
        _, name, log, status, results = argv
        text = Path(log).read_text(encoding="utf-8", errors="replace") if Path(log).exists() else ""
        emit(name, {"exit_status": int(status), **pytest_counts(text)}, results)
        return 0
    if len(argv) != 1:
        print("usage: python benchmarks/benchlog.py RESULTS.jsonl", file=sys.stderr)
        return 2
    if not Path(argv[0]).exists():
        print(f"no measurement was taken ({argv[0]} does not exist)")
        return 1
    rows = read_results(argv[0])
    for row in rows:
        print(summary_line(row))
    by_name = {row.get("name"): row for row in rows}
    for name in by_name:  # a run killed between its two phases still has both rows: the ratio from them
        config = str(name).removesuffix("/sapo")
        trl = by_name.get(f"{config}/trl")
        if str(name).endswith("/sapo") and trl and f"{config}/ratio" not in by_name and trl.get("step_mean_s"):
            ratio = by_name[name]["step_mean_s"] / trl["step_mean_s"]
            print(f"{config}/ratio (from the sapo and trl rows) step_ratio {ratio:.4g}")
    print(f"({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
