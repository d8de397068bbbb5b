"""The import layers of the README's diagram, enforced: every first-party module sits in one layer, imports only
its own layer and the ones below (function-local imports included), and no modules import each other in a
cycle. decode/ and metrics/ therefore never reach training code (the loop, engine/perf/, checkpoints, the
sampler)."""
import ast
from pathlib import Path

from conftest import ROOT

LAYERS = [  # bottom first
    ("base", ["engine", "engine.errors", "engine.files", "engine.paths", "engine.options", "engine.faults",
              "engine.quiet", "engine.schedule", "engine.distributed"]),
    ("recipe and data", ["engine.config", "engine.data", "engine.batch", "engine.labels", "engine.split",
                         "engine.tiny", "engine.sample_data"]),
    ("model", ["decode.forward", "engine.lora", "engine.model", "engine.loss"]),
    ("metrics", ["metrics", "metrics.*"]),
    ("decode", ["decode", "decode.*"]),
    ("perf", ["engine.perf", "engine.perf.*"]),
    ("training", ["engine.evaluate", "engine.checkpoint", "engine.sampling", "engine.curves",
                  "engine.compare", "engine.sensitivity", "engine.run_dir", "engine.loop"]),
    ("entry points", ["train", "infer"]),
]
LEVER_KEYS = {"compile", "recompute_in_graph", "save_matmuls", "keep_activations", "fused_lora", "dropout_kernel",
              "expand_double_quant", "dequant_in_graph", "packing", "speed", "memory_gib", "cuda_graphs"}


def first_party() -> dict[str, Path]:
    paths = [*(ROOT / "engine").rglob("*.py"), *(ROOT / "decode").rglob("*.py"), *(ROOT / "metrics").rglob("*.py"),
             ROOT / "train.py", ROOT / "infer.py"]
    mods = {}
    for p in paths:
        parts = p.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def imports(path: Path, mods: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m in mods}


def layer_of(module: str) -> int:
    exact = [i for i, (_, names) in enumerate(LAYERS) if module in names]
    if exact:
        return exact[0]
    prefixed = [(len(p), i) for i, (_, names) in enumerate(LAYERS) for p in names
                if p.endswith(".*") and module.startswith(p[:-1])]
    assert prefixed, f"{module} is in no layer of the diagram: place it in tests/test_layers.py and the README"
    return max(prefixed)[1]


def graph() -> dict[str, set[str]]:
    mods = first_party()
    return {name: imports(path, mods) - {name} for name, path in mods.items()}


def test_every_import_points_down_the_diagram():
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in graph().items() for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not upward, upward


def test_no_import_cycle():
    edges = graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_lever_key_is_read_outside_the_perf_layer():
    """Only engine/perf/ acts on the speed levers (engine/config.py declares them and checks their rules):
    the loop, the evaluator, decode and infer read none. `re.compile` and `torch.compile` are not levers."""
    for name, path in first_party().items():
        if name == "engine.perf" or name.startswith("engine.perf.") or name == "engine.config":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr in LEVER_KEYS
                and not (isinstance(n.value, ast.Name) and n.value.id in ("re", "torch"))}
        assert not read, (name, read)


def test_the_readme_diagram_names_every_layer():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    head = readme[: readme.index("## Quick start")]
    for name, _ in LAYERS:
        assert name in head, name
