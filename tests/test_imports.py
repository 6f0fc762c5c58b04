"""The package's layers, read from the source: no import circle, and the lower layers never import the upper ones.

Modules are named by their dotted path under `sapo` (`run.state`, `generation`); a package's `__init__` is the
package's own name. Lazy imports inside functions count too: a circle through them still couples the modules.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sapo"
# The algorithm: pure pieces that know no trainer, no config and no command.
ALGORITHM = {"segments", "batching", "buffer", "ema", "losses", "packing", "logprobs", "generation", "sharding", "data",
             "layout", "errors", "checkpoint", "copies", "recipes", "tasks", "tiny", "demo_kit", "judging", "heldout",
             "metrics", "decode_attention", "decode_state", "topk_sampling", "scoring", "loading", "fserrors", "outdir",
             "start_weights", "pair_attention"}
# The run directory's primitives (paths, lock, durable publishing, resume records, signals): no trainer either.
ALGORITHM |= {"run.paths", "run.lock", "run.publish", "run.resume", "run.signals", "run.outdir", "run.fserrors",
              "run.start_weights", "run"}
# The trainer and the parts that take it: the Python API, which works without the CLI.
TRAINER = {"trainer", "config", "config_checks", "model_card", "callbacks", "step_guard", "heldout_eval", "_hf_compat",
           "schedules", "run.start", "run.state", "run.finish", "trl_compat"}
COMMANDS = {"cli", "demo", "evaluation", "inspection", "plots", "__main__"}  # shims included (old paths)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def resolve(dotted: str) -> str | None:
    """The module `sapo.<dotted>` names: itself, or the nearest package above a name defined in one."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imports_of(name: str, path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sapo":
            base = node.module.partition(".")[2]
            targets = [f"{base}.{a.name}" if base else a.name for a in node.names]
            found.update(filter(None, (resolve(t) for t in targets)))
        elif isinstance(node, ast.Import):
            found.update(filter(None, (resolve(a.name.partition(".")[2]) for a in node.names
                                       if a.name.startswith("sapo."))))
    return found - {name}


def graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path) for name, path in MODULES.items() if name}


def layer_of(module: str) -> str:
    for name, members in (("algorithm", ALGORITHM), ("trainer", TRAINER), ("commands", COMMANDS)):
        if module in members:
            return name
    for name, members in (("algorithm", ALGORITHM), ("trainer", TRAINER), ("commands", COMMANDS)):
        if module.split(".")[0] in members:
            return name
    raise AssertionError(f"module sapo.{module} needs a layer in tests/test_imports.py")


def test_no_import_circle():
    edges, state = graph(), {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import circle: {' -> '.join([*trail, module])}"
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(edges):
        visit(module, [])


def test_the_graph_sees_subpackages():
    assert "run.state" in graph()["trainer"], "the import reader misses `from sapo.run import state`"


def test_lower_layers_import_no_trainer_or_command():
    rank = {"algorithm": 0, "trainer": 1, "commands": 2}
    for module, targets in graph().items():
        for target in targets:
            assert rank[layer_of(target)] <= rank[layer_of(module)], f"sapo.{module} imports sapo.{target}"
