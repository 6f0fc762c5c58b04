"""The package's layers, read from the source: no import circle, and the lower layers never import the upper ones.

Lazy imports inside functions count too: a circle through them still couples the modules.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sapo"
ALGORITHM = {"segments", "buffer", "ema", "losses", "packing", "logprobs", "generation", "sharding", "data", "layout",
             "errors", "checkpoint", "copies", "recipes", "tasks", "tiny", "judging", "heldout",
             "decode_attention", "scoring", "loading", "decode_state", "topk_sampling", "outdir", "fserrors",
             "start_weights"}
COMMANDS = {"cli", "demo", "evaluation", "inspection", "plots", "__main__"}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sapo"):
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("sapo."))
    return found - {path.stem}


def graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in PACKAGE.glob("*.py") if path.stem != "__init__"}


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


def test_lower_layers_import_no_trainer_or_command():
    edges = graph()
    assert ALGORITHM | COMMANDS | {"trainer", "config", "model_card"} >= set(edges), "a new module needs a layer"
    for module in ALGORITHM:
        assert not edges[module] & ({"trainer", "config"} | COMMANDS), module
    for module in ("trainer", "config", "model_card"):  # the Python API works without the CLI
        assert not edges[module] & COMMANDS, module
