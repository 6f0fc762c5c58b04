"""The offline demo kit: tiny models built from a config (`tiny`: no download, seconds on a CPU) and task families
with exact judges (`tasks`, `task_judges`), used by `sapo demo`, the tests and the benchmarks. Not needed to train
a real model.

`sapo.tiny` and `sapo.tasks` (with `sapo.tasks:judge`) are the old paths, kept for one release.
"""
