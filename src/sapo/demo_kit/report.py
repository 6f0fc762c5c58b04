"""The demo's closing report: before/after judge scores per task family, whether the change is beyond noise, and
the next commands to run on the demo's outputs.

The before and after models answer the same held-out prompts, so the change is measured per prompt: its mean and
the standard error of that mean (sd / sqrt(n) of the per-prompt differences). A change within two standard errors
is what re-running with another seed could give, and the report says so in words rather than leave a reader to
guess whether 0.501 -> 0.497 means anything.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sapo.demo_kit.tasks import ALL_FAMILIES

NOISE_SE = 2.0  # a change within this many standard errors of the paired difference is called noise


def paired_difference(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """Mean of `after - before` per prompt and its standard error (nan for fewer than two prompts)."""
    if len(before) != len(after):
        raise ValueError(f"paired difference: {len(before)} scores before but {len(after)} after")
    if not before:
        raise ValueError("paired difference: no scores")
    diffs = [a - b for b, a in zip(before, after, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"n": n, "mean": mean, "se": math.nan}
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return {"n": n, "mean": mean, "se": math.sqrt(variance / n)}


def verdict(change: Mapping[str, float]) -> str:
    """Plain words for a paired difference: no change, within noise, or a gain/drop beyond noise."""
    mean, se = change["mean"], change["se"]
    if math.isnan(se):
        return "too few prompts to tell"
    if se == 0.0:
        return "no change" if mean == 0.0 else ("gain" if mean > 0 else "drop")
    if abs(mean) <= NOISE_SE * se:
        return "within noise"
    return f"{'gain' if mean > 0 else 'drop'} beyond noise"


def _families(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Families present, in the suite's order (arithmetic, string, constraint, ...), unknown ones last."""
    order = {family: i for i, family in enumerate(ALL_FAMILIES)}
    return sorted(dict.fromkeys(record["task"] for record in records), key=lambda f: (order.get(f, len(order)), f))


def _indices(records: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Prompt indices of "overall" (all of them) and of each family."""
    groups = {"overall": list(range(len(records)))}
    for family in _families(records):
        groups[family] = [i for i, record in enumerate(records) if record["task"] == family]
    return groups


def family_changes(records: Sequence[Mapping[str, Any]], before: Sequence[float],
                   after: Sequence[float]) -> dict[str, dict[str, float]]:
    """`paired_difference` overall (key "overall") and per task family."""
    return {family: paired_difference([before[i] for i in idx], [after[i] for i in idx])
            for family, idx in _indices(records).items()}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def score_table(records: Sequence[Mapping[str, Any]], columns: Mapping[str, Sequence[float]]) -> str:
    """One row per family (and overall): n, each model's mean score (one column per entry of `columns`, the first
    being "before", the second "after"), then after's paired change with its standard error and the verdict."""
    names = list(columns)
    before, after = columns[names[0]], columns[names[1]]
    widths = [max(8, len(name) + 2) for name in names]
    header = (f"{'held-out judge score':<22}{'n':>5}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
              + f"{'change':>9}{'± s.e.':>8}  verdict")
    lines = [header, "-" * len(header)]
    for family, idx in _indices(records).items():
        change = paired_difference([before[i] for i in idx], [after[i] for i in idx])
        lines.append(f"{family:<22}{len(idx):>5}"
                     + "".join(f"{_mean([columns[n][i] for i in idx]):>{w}.3f}" for n, w in zip(names, widths,
                                                                                               strict=True))
                     + f"{change['mean']:>+9.3f}{change['se']:>8.3f}  {verdict(change)}")
    if len(lines) > 4 and any(line.endswith("beyond noise") for line in lines[3:]):  # several families tested
        lines.append("(one family beyond 2 s.e. among several can be chance: the overall row is the one to read)")
    return "\n".join(lines)


def conclusion(change: Mapping[str, float], name: str, baseline: str) -> str:
    """One sentence on the overall paired change of `name` against `baseline`."""
    words = verdict(change)
    mean, se = change["mean"], change["se"]
    if words == "within noise":
        return (f"{name} vs {baseline}: {mean:+.3f} ± {se:.3f} (s.e. of the paired per-prompt difference) is within "
                f"{NOISE_SE:g} standard errors: no evidence of a change; another seed could move it either way.")
    if words.endswith("beyond noise"):
        return (f"{name} vs {baseline}: {mean:+.3f} ± {se:.3f} (s.e. of the paired per-prompt difference) is more "
                f"than {NOISE_SE:g} standard errors from zero: a {words.split()[0]} on these prompts.")
    return f"{name} vs {baseline}: {mean:+.3f} ({words})."


def runnable_sapo(cwd: Path | None = None) -> str:
    """How to call this installation's `sapo` from the demo's shell: `sapo` when that is what the PATH finds, else
    the script next to this Python (`.venv/bin/sapo` after `make demo`, which installs into a venv it does not
    activate; relative to `cwd` when under it), else `python -m sapo`."""
    script = Path(sys.executable).with_name("sapo")
    found = shutil.which("sapo")
    if found and script.exists() and os.path.samefile(found, script):
        return "sapo"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m sapo"
    try:
        return shlex.quote(str(script.absolute().relative_to((cwd or Path.cwd()).absolute())))
    except ValueError:
        return shlex.quote(str(script.absolute()))


def next_commands(*, sft_dir: Path, sapo_dir: Path, heldout: Path, max_new_tokens: int,
                  program: str = "sapo") -> list[tuple[str, str]]:
    """(command, what it shows) for `sapo plot`, `sapo inspect` and `sapo eval` on the demo's outputs, paths as the
    demo was given them and `program` as `runnable_sapo` finds it, so each runs as printed from the same directory."""
    q = shlex.quote
    return [
        (f"{program} plot {q(str(sapo_dir))}", f"training curves as PNG files in {sapo_dir / 'plots'}"),
        (f"{program} inspect {q(str(sapo_dir))}", "replay-buffer pairs: the segment the EMA model rewrote in each"),
        (f"{program} eval {q(str(sft_dir))} {q(str(sapo_dir))} --data {q(str(heldout))} --max_new_tokens "
         f"{max_new_tokens}", "the held-out scores again from the saved models, with per-prompt win rates"),
    ]


def format_next(commands: Sequence[tuple[str, str]]) -> str:
    """`Next:` and each command under a comment saying what it shows, ready to copy."""
    return "Next:\n" + "\n".join(f"  # {what}\n  {command}" for command, what in commands)
