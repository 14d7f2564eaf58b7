"""The dependency direction of fastebm's lower layers, read from the sources' import statements:
kernels import nothing from fastebm outside themselves; ops never import models, engines, restore,
corrupt, data, train, eval or cli; models and energy never import engines, restore, train, eval or
cli; engines never import train, eval or cli."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path, package: str):
    """Absolute names of the modules ``path`` (a module of ``package``) imports."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            names.add(mod)
            names.update(f"{mod}.{alias.name}" for alias in node.names)
    return names


def sources(folder: str, package: str):
    return [(p, package) for p in sorted((ROOT / folder).glob("*.py"))]


FORBIDDEN = {
    "kernels": (sources("kernels", "fastebm.kernels"), ("fastebm.",), ("fastebm.kernels",)),
    "ops": (sources("fastebm/ops", "fastebm.ops"),
            tuple(f"fastebm.{m}" for m in ("models", "engines", "restore", "corrupt", "data", "train", "eval", "cli")),
            ()),
    "models": (sources("fastebm/models", "fastebm.models") + [(ROOT / "fastebm/energy.py", "fastebm")],
               tuple(f"fastebm.{m}" for m in ("engines", "restore", "train", "eval", "cli")), ()),
    "engines": (sources("fastebm/engines", "fastebm.engines"),
                tuple(f"fastebm.{m}" for m in ("train", "eval", "cli")), ()),
}


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_lower_layers_import_only_downwards(layer):
    files, forbidden, allowed = FORBIDDEN[layer]
    assert files
    bad = []
    for path, package in files:
        for mod in imported_modules(path, package):
            hit = any(mod == f.rstrip(".") or mod.startswith(f if f.endswith(".") else f + ".") for f in forbidden)
            if hit and not any(mod == a or mod.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, bad
