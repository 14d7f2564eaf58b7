"""The dependency direction of fastebm (docs/design.md §3), read from every module's import statements:

    cli -> train / eval -> restore / engines / models / energy / corrupt / data -> ops -> kernels

plus neutral modules (errors, files, settings, checkpoint, log, distributed, runlog, signals, threads) that
train and eval share and that import none of the layers above ops. Imports inside functions count too
(``ast.walk`` sees them). Every module of the package must belong to a layer, so a new module cannot slip
past the rules.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Top-level names under ``fastebm`` that each layer must never import.
UPPER = ("cli",)
APPS = ("train", "eval", "tools") + UPPER
BODY = ("restore", "engines", "models", "energy", "corrupt", "data")
NEUTRAL = ("errors", "files", "settings", "checkpoint", "log", "distributed", "runlog", "signals", "threads")
FORBIDDEN = {
    "cli": (),
    "train": UPPER,
    "eval": ("train", "tools") + UPPER,
    "tools": ("train",) + UPPER,
    "restore": APPS + ("data",),
    "engines": APPS + ("restore", "data", "corrupt"),
    "models": APPS + ("restore", "engines", "data", "corrupt", "distributed", "checkpoint"),
    "energy": APPS + ("restore", "engines", "models", "data", "corrupt"),
    "corrupt": APPS + ("restore", "engines", "models", "energy", "data"),
    "data": APPS + ("restore", "engines", "models", "energy", "corrupt", "ops"),
    "ops": APPS + BODY + NEUTRAL[1:],
    "errors": APPS + BODY + NEUTRAL[1:] + ("ops",),
    "files": APPS + BODY + NEUTRAL[2:] + ("ops",),  # only fastebm.errors
    "settings": APPS + BODY + NEUTRAL[3:] + ("files", "ops"),  # only fastebm.errors
    "checkpoint": APPS + BODY + ("ops", "settings", "distributed", "log", "runlog", "signals"),
    "log": APPS + BODY + ("ops", "checkpoint"),
    "distributed": APPS + BODY + ("ops", "checkpoint"),
    "runlog": APPS + BODY + ("ops", "checkpoint", "distributed"),
    "signals": APPS + BODY + NEUTRAL[:-1] + ("ops",),  # standard library only
    "threads": APPS + BODY + NEUTRAL[:-1] + ("ops",),  # imported first by fastebm/__init__.py: standard library only
}
ROOT_MODULES = ("__init__", "__main__")  # the package's public face and launcher sit above everything


def imported_modules(path: Path, package: str):
    """Absolute names of the modules ``path`` (a module of ``package``) imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                mod = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module
            names.add(mod)
            names.update(f"{mod}.{alias.name}" for alias in node.names)
    return names


def package_modules():
    """(path, package it belongs to, layer) of every module of fastebm; kernels/ is fastebm.kernels."""
    out = []
    for path in sorted((ROOT / "fastebm").rglob("*.py")):
        rel = path.relative_to(ROOT / "fastebm").with_suffix("").parts
        package = ".".join(("fastebm",) + rel[:-1])  # relative imports resolve against the containing package
        out.append((path, package, rel[0]))
    out += [(p, "fastebm.kernels", "kernels") for p in sorted((ROOT / "kernels").rglob("*.py"))]
    return out


def top_level(mod: str):
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "fastebm" else None


def test_every_module_belongs_to_a_layer():
    stray = [str(p.relative_to(ROOT)) for p, _, layer in package_modules()
             if layer not in FORBIDDEN and layer != "kernels" and layer not in ROOT_MODULES]
    assert not stray, f"modules outside every layer of tests/test_import_graph.py: {stray}"


def test_kernels_import_nothing_from_fastebm():
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p, pkg, layer in package_modules() if layer == "kernels"
           for m in imported_modules(p, pkg) if m.startswith("fastebm") and not m.startswith("fastebm.kernels")]
    assert not bad, bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downwards(layer):
    files = [(p, pkg) for p, pkg, lay in package_modules() if lay == layer]
    assert files, f"no module in layer {layer}"
    bad = []
    for path, package in files:
        for mod in imported_modules(path, package):
            target = top_level(mod)
            if target in FORBIDDEN[layer] or (target == "kernels" and layer not in ("ops",)):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


def test_the_rules_catch_a_wrong_import(tmp_path):
    """The checker itself: an ops module importing the trainer is reported."""
    fake = tmp_path / "bad.py"
    fake.write_text("def f():\n    from ..train.trainer import Trainer\n")
    mods = imported_modules(fake, "fastebm.ops")
    assert "fastebm.train.trainer" in mods and top_level("fastebm.train.trainer") in FORBIDDEN["ops"]
