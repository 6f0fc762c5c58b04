"""Quality benchmark in the paper's shape: a start fine-tuned on one split of demonstrations, then SAPO and its
peers on a disjoint split of NEW demonstrations of the same families, with ablations of SAPO's parts.

    python benchmarks/quality.py --quick            # the same protocol, reduced: about 4 CPU-minutes
    python benchmarks/quality.py --full             # docs/results/quality.md's protocol: hours on 2 CPU cores
                                                    # (that page's run starts each grid: --recipe_learning_rates)
    python benchmarks/quality.py --full --out DIR   # outputs elsewhere (default runs/quality, runs/quality-quick)

Protocol (identical for every run, so that only the recipe or the ablated part differs):

* Data: the structured task families of :mod:`sapo.tasks` (``chain``: worked multi-step sums; ``listing``:
  numbered sorts and reversals; ``profile``: facts as sentences; ``format``: lines under several checkable
  constraints), whose judges give partial credit. Two sides: the START's demonstrations and the NEW ones, on
  disjoint prompts. Under the default split rule ``harder`` the new side is the larger instances of every family
  (``HARDER_FROM``: chains of 6-7 numbers, lists of 8-9 words, 5 facts, 5 lines) and the start's side the smaller
  ones; under ``same`` both sides are one distribution split by a hash of the prompt. Dev (choices) and
  held-out (the table) prompts are new-side and disjoint from both training sides by the suite's hash split.
* Why ``harder``: the paper's SAPO gets demonstrations its start has not learned. A disjoint split of the same
  distribution is what the old protocol's held-out split already was, and a converged start scored 0.827 there
  (profile 0.994): it rewrote 51% of its answers into themselves (profile 100%, chain 72%), and an identical
  pair carries no gradient. Training the start less on the same distribution would make every recipe's gain
  the SFT it skipped. Larger instances of the learned families are new to the start and stay in reach of the
  same skills. The start's census (below) measures it before anything long runs: at ``--quick`` size, 0% of
  the start's rewrites of the new side are identical under either rule (its start is weak); the run stops when
  more than ``max_start_identical`` are (the ``--full`` start's figure is in its table).
* Start: ONE SFT checkpoint (tiny Llama, ``hidden_size`` x ``num_layers``) trained on the start's side only with a
  cosine schedule; its dev score on both sides every ``sft_eval_every`` steps (the SFT curves). Shared by every
  run, cached in ``OUT/sft``. Its census of the new side: its segment rewrites of ``diagnostic_per_family`` new
  training records per family, made exactly as SAPO's generator makes them (``sapo.segments.rewrite_segments``
  through the trainer's sampler), at each of ``census_temperatures``: identical to the real answer, judged
  worse. Its rewrites at the base temperature are the FIXED pairs of the diagnostics.
* Recipes from that checkpoint, all on the same new demonstrations: ``sft`` (continued SFT: the baseline SAPO
  must beat), ``dpo`` and ``orpo`` (offline, on the records' near-miss ``rejected`` answers), ``spin``,
  ``sapo-dpo``, ``sapo-orpo``, and ``sapo-rpo`` (SAPO-DPO plus the real answers' NLL at weight 1, sapo's
  ``nll_weight``: RPO's term). Equal optimizer steps, batch, schedule (AdamW, linear warm-up then linear decay
  to 0, as in the paper) and lengths.
* Grid: each recipe's learning rate (and beta, when ``grid_betas`` has several) is chosen on dev (seed 0). When a
  recipe's best dev score is at the lowest or highest learning rate tried, the grid grows one step past that
  edge (the edge times its ratio to its neighbour), up to ``grid_widen`` times; a recipe still at an edge is
  marked so in the table. The chosen setting then runs with every seed on held-out prompts.
* Ablations, from ``sapo-dpo`` with its chosen setting (seeds ``ablation_seeds``, default all): identical-pair
  handling off (``keep``: the paper, identical rewrites enter the buffer and every step runs), step skipping off
  (``no-skip``) and on with identical pairs kept (``keep-skip``), segment vs whole response (``whole``), EMA vs the
  current policy as generator (``no-ema``), temperature 0.3 / 1.0 (``T0.3``, ``T1``; base 0.7), and the judge
  filter beyond the paper (``judge``: ``rejected_judge`` = the task judge, a rewrite kept only when scored below
  the real answer). More are available by name (``G12``, ``no-replay``, ``ref-policy``, ``ref-fixed``...).
* Evaluation: greedy decoding, scored by ``sapo.tasks.judge``, every ``eval_every`` steps and after the last.
  Scores are at equal steps (the last step) and at equal wall time (interpolated on the curve at the training
  time of the fastest recipe of the same seed; evaluation excluded). Win rates are per held-out prompt against
  the start, a tie counting half. Rows give mean ± sample std over seeds.
* Diagnostics, at every evaluation point, against the FIXED start (never a reference refreshed at the
  evaluation step): per family, the real answers' per-token log-likelihood change on the census records, the
  margin (log p(y) - log p0(y)) - (log p(y-) - log p0(y-)) on the start's non-identical rewrites and its
  accuracy; the parameter distance from the start. From sapo's training logs: the identical fraction before
  handling, ties, pairs dropped, pairs judged not worse, steps skipped. For SAPO runs, per family: the census
  of the final generator (identical, judged worse) and of the final replay buffer (segment start, judged worse).

Outputs in ``--out``: ``results.json``, ``table.md`` (also printed), ``curves.png``, ``diagnostics.png``, ``sft/``
(the checkpoint, ``start.json`` with its census and fixed pairs, ``trained_prompts.json``) and
``runs/GROUP/NAME/seed-N/`` (``result.json``, reused by a later invocation when its settings match,
``trained_prompts.json``: the prompts the run's trainer was given, decoded from its own training set, and
``metrics.jsonl`` for ``sapo plot``). Runs go to ``--workers`` processes with one torch thread each.
"""


from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # the quality_bench package beside it, from any cwd, also
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # when loaded by path (tests/helpers.load_benchmark)
# The code lives in quality_bench/ (one module per job); this script is the command line, and its namespace keeps
# the names the tests and earlier callers use.
from quality_bench.diagnostics import fixed_pair_scores, probe_of  # noqa: E402
from quality_bench.protocol import ablation_specs, check, main_specs, run_benchmark  # noqa: E402
from quality_bench.report import _cell, _tuning_text, markdown_table, plot_curves, plot_diagnostics  # noqa: E402
from quality_bench.runs import config_of, execute, run_all, worker_main  # noqa: E402
from quality_bench.settings import (  # noqa: E402
    ABLATION_TEXT,
    BASE,
    CENSUS_KEYS,
    QUICK,
    RECIPES,
    RUN_KEYS,
    SFT_KEYS,
    START,
    SUITE_KEYS,
    RunSpec,
    Settings,
    ablation_settings,
    run_key,
)
from quality_bench.settings import key_of as _key  # noqa: E402 (its name before the split)
from quality_bench.suite import HARDER_FROM, suite_of  # noqa: E402
from quality_bench.summary import _stats, score_at_time, summarise  # noqa: E402
from quality_bench.tuning import at_edge, choose, grid_specs, pinned, tune, widened  # noqa: E402

__all__ = ["ABLATION_TEXT", "BASE", "CENSUS_KEYS", "HARDER_FROM", "QUICK", "RECIPES", "RUN_KEYS", "SFT_KEYS", "START",
           "SUITE_KEYS", "RunSpec", "Settings", "_cell", "_key", "_stats", "_tuning_text", "ablation_settings",
           "ablation_specs", "at_edge", "build_parser", "check", "choose", "config_of", "execute",
           "fixed_pair_scores", "grid_specs", "main", "main_specs", "markdown_table", "pinned", "plot_curves",
           "plot_diagnostics", "probe_of", "run_all", "run_benchmark", "run_key", "score_at_time",
           "settings_from_args", "suite_of", "summarise", "tune", "widened", "worker_main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=f"shorter run, about 4 CPU-minutes: {QUICK}")
    mode.add_argument("--full", action="store_true", help="the run docs/results/quality.md reports (the default)")
    defaults = Settings()
    for item in dataclasses.fields(Settings):
        value = getattr(defaults, item.name)
        if isinstance(value, tuple):
            parser.add_argument(f"--{item.name}", nargs="+", type=type(value[0]) if value else str, default=None,
                                help=f"(full: {' '.join(map(str, value))})")
        else:
            parser.add_argument(f"--{item.name}", type=type(value), default=None, help=f"(full: {value})")
    return parser


def settings_from_args(argv: Sequence[str]) -> Settings:
    args = build_parser().parse_args(list(argv))
    values = dataclasses.asdict(Settings())
    if args.quick:
        values.update(QUICK)
        values["out"] = "runs/quality-quick"
    for name in values:
        given = getattr(args, name)
        if given is not None:
            values[name] = tuple(given) if isinstance(values[name], tuple) else given
    return Settings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    settings = settings_from_args(argv)
    result = run_benchmark(settings)
    print("\n" + result["table"])
    print(f"wrote {Path(settings.out) / 'table.md'}, results.json and curves.png; "
          f"wall time {result['seconds']:.0f} s ({result['seconds'] / 60:.1f} min)")
    finals = [r["final"]["overall"] for r in result["runs"]]
    return 0 if all(math.isfinite(v) for v in finals) else 1


if __name__ == "__main__":
    raise SystemExit(main())
