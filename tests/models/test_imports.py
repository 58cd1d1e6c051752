"""fastacl.models imports one way: every fastacl import at module top level, the modules a DAG."""

import ast
import graphlib
from pathlib import Path

import fastacl.models

PACKAGE = Path(fastacl.models.__file__).parent
# Who imports whom inside fastacl.models (the package's __init__ imports them all).
LAYERS = {
    "dual_bn": set(),
    "contrastive": {"dual_bn"},
    "resnets": {"contrastive", "dual_bn"},
    "resnet": {"contrastive", "resnets"},
    "wrn": {"contrastive", "dual_bn", "resnets"},
    "vit": {"contrastive", "dual_bn"},
    "registry": {"contrastive", "resnet", "resnets", "vit", "wrn"},
    "folded": {"contrastive", "dual_bn", "resnets"},
    "checkpoint": {"registry"},
    "published": {"checkpoint", "registry"},
}


def _fastacl_modules(nodes) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif node.level:  # relative: name the module it means
            names.add("fastacl.models" + (f".{node.module}" if node.module else ""))
        else:
            names.add(node.module)
    return {name for name in names if name == "fastacl" or name.startswith("fastacl.")}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(fastacl modules imported at module level, those imported inside a function or class)."""
    tree = ast.parse(path.read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    nested = [node for node in ast.walk(tree)
              if isinstance(node, (ast.Import, ast.ImportFrom)) and node not in top]
    return _fastacl_modules(top), _fastacl_modules(nested)


def test_every_fastacl_import_is_at_module_level():
    for path in sorted(PACKAGE.glob("*.py")):
        _, nested = _imports(path)
        assert not nested, f"{path.name} imports {sorted(nested)} inside a function or class"


def test_the_modules_import_each_other_as_a_dag():
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "__init__":
            continue
        top, _ = _imports(path)
        assert "fastacl.models" not in top, f"{path.name} imports the package that imports it"
        graph[path.stem] = {name.rsplit(".", 1)[1] for name in top
                            if name.startswith("fastacl.models.")}
    assert graph == LAYERS
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a cycle
