"""The quality benchmark's code, one module per job; `benchmarks/quality.py` is its command line and describes the
protocol. In the order the protocol uses them: `settings` (recipes, settings, run specs, cache keys), `suite` (the
data), `start` (the SFT start and its census), `tuning` (the dev grid), `runs` (one run, its cache, the worker
processes), `evaluation` and `diagnostics` (what each run measures), `summary` and `report` (results.json,
table.md, the figures) and `protocol` (all of it in order)."""
