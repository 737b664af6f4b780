"""The package's modules import one way, downwards. Bottom to top: the core; the concepts file and the CLIP loader
(read by training and evaluation alike); training and evaluation, side by side, neither importing the other; the
demo world; the app; the test fixtures, which only the command line's `tiny-checkpoint` ships to users; the command
line. Every module is parsed, imports inside functions and under TYPE_CHECKING included: an upward import inside a
function makes no circle when the package loads, so nothing else would catch it (the evaluator once took the
scheduler table from `cli`)."""

import ast
from pathlib import Path

import pytest

import mole_diffusion

PACKAGE = Path(mole_diffusion.__file__).parent

# (layer, its modules or subpackages of mole_diffusion), bottom to top; a module may import from its own layer and
# those below. Layers in one tuple are side by side: neither imports the other.
LAYERS = [
    ("core", ["__init__", "errors", "quiet", "files", "lycoris", "experts", "layers", "gates", "config", "routing", "inject",
              "gate_file", "schedulers", "offline_tokenizers", "pipelines"]),
    ("concepts", ["concepts", "clip"]),
    (("train", ["train"]), ("eval", ["eval"])),
    ("demo", ["demo"]),
    ("app", ["ui"]),
    ("testing", ["testing"]),
    ("cli", ["cli"]),
]


def layer_table(layers: list) -> dict[str, tuple[str, int]]:
    """{first part of a module's name under the package: (its layer, the layer's height)}."""
    table = {}
    for height, level in enumerate(layers):
        for name, parts in level if isinstance(level[0], tuple) else [level]:
            table.update({part: (name, height) for part in parts})
    return table


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    """The modules an import statement reads: ``from .. import world`` in ``mole_diffusion.eval.stats`` reads
    ``mole_diffusion.world`` if that is a module, else the package ``mole_diffusion``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        parts = importer.split(".")
        base = parts if is_package else parts[:-1]
        base = base[: len(base) - node.level + 1]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module
    return [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]


def package_imports(package: Path) -> tuple[list[str], list[tuple[str, str, int, str]]]:
    """(every module of ``package``; every import in it, as (file, importing module, line, imported module))."""
    paths = sorted(package.rglob("*.py"))
    modules = {module_name(path, package) for path in paths}
    imports = []
    for path in paths:
        importer, where = module_name(path, package), path.relative_to(package.parent).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        nodes = sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))), key=lambda n: n.lineno)
        for node in nodes:
            for module in dict.fromkeys(imported_modules(node, importer, path.name == "__init__.py", modules)):
                imports.append((where, importer, node.lineno, module))
    return [module_name(path, package) for path in paths], imports


def upward_imports(package: Path, layers: list) -> tuple[list[str], list[str]]:
    """(every import of a module from a layer above its own, or from a layer beside it, or of ``experiments``, as
    ``file:line imports X (layer a above layer b)``; the modules that belong to no layer)."""
    table = layer_table(layers)

    def layer(module: str) -> tuple[str, int] | None:
        parts = module.split(".")
        return table.get(parts[1] if len(parts) > 1 else "__init__")

    modules, imports = package_imports(package)
    found = []
    for where, importer, line, module in imports:
        own, theirs, top = layer(importer), layer(module), module.split(".")[0]
        if top == "experiments":
            found.append(f"{where}:{line} imports {module} (experiments are not part of the package)")
        # a module of no layer is reported once, as such
        if top != package.name or own is None or theirs is None or theirs == own or theirs[1] < own[1]:
            continue
        relation = "above" if theirs[1] > own[1] else "beside"
        found.append(f"{where}:{line} imports {module} (layer {theirs[0]} {relation} layer {own[0]})")
    return found, [module for module in modules if layer(module) is None]


def import_circles(package: Path) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (each group sorted)."""
    modules, imports = package_imports(package)
    graph = {module: set() for module in modules}
    for _, importer, _, module in imports:
        if module in graph and module != importer:
            graph[importer].add(module)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reached = {module: reach(module) for module in modules}
    circles = {tuple(sorted({m} | {n for n in reached[m] if m in reached[n]})) for m in modules if m in reached[m]}
    return sorted(list(circle) for circle in circles)


def test_every_module_of_the_package_has_a_layer():
    _, unplaced = upward_imports(PACKAGE, LAYERS)
    assert unplaced == [], f"add these modules to a layer in tests/test_layers.py: {unplaced}"


def test_no_module_imports_a_layer_above_or_beside_its_own():
    found, _ = upward_imports(PACKAGE, LAYERS)
    order = ", ".join(" | ".join(name for name, _ in level) if isinstance(level[0], tuple) else level[0] for level in LAYERS)
    assert not found, f"imports against the layers (bottom to top: {order}):\n" + "\n".join(found)


def test_no_modules_import_each_other_in_a_circle():
    """Within a layer too: a circle works only in the order Python happens to meet it, and hides which module is
    the lower one (the demo's build and its judge once took helpers from each other)."""
    assert import_circles(PACKAGE) == []


@pytest.fixture
def tiny_package(tmp_path) -> Path:
    """A package laid out like mole_diffusion, with one import of each kind the check must see."""
    package = tmp_path / "mole_diffusion"
    files = {
        "__init__.py": "from .errors import MoLEError\n",
        "errors.py": "import os\n",
        "cli.py": "from . import testing\n",
        "testing.py": "from .errors import MoLEError\n",
        "ui.py": "def make():\n    from .testing import make_tiny_pipeline\n",
        "eval/__init__.py": "",
        "eval/stats.py": "from ..errors import MoLEError\n\n\ndef rate():\n    from ..demo import world\n",
        "eval/presence.py": "import mole_diffusion.train.common\n",
        "train/__init__.py": "from ..concepts import load_concepts\n",
        "train/common.py": "from mole_diffusion import cli\n",
        "concepts.py": "from .errors import MoLEError\n",
        "demo/__init__.py": "from .world import draw\n",
        "demo/world.py": "from .. import eval\nimport experiments.spatial\n",
        "demo/build.py": "from .judge import train_judge\n",
        "demo/judge.py": "def save():\n    from .build import write_atomically\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_the_check_finds_relative_absolute_and_function_level_imports_upward(tiny_package):
    found, unplaced = upward_imports(tiny_package, LAYERS)
    assert unplaced == []
    assert found == [
        "mole_diffusion/demo/world.py:2 imports experiments.spatial (experiments are not part of the package)",
        "mole_diffusion/eval/presence.py:1 imports mole_diffusion.train.common (layer train beside layer eval)",
        "mole_diffusion/eval/stats.py:5 imports mole_diffusion.demo.world (layer demo above layer eval)",
        "mole_diffusion/train/common.py:1 imports mole_diffusion.cli (layer cli above layer train)",
        "mole_diffusion/ui.py:2 imports mole_diffusion.testing (layer testing above layer app)",
    ]
    (tiny_package / "lab.py").write_text("")
    assert upward_imports(tiny_package, LAYERS)[1] == ["mole_diffusion.lab"]


def test_the_check_finds_a_circle_within_a_layer(tiny_package):
    assert import_circles(tiny_package) == [["mole_diffusion.demo.build", "mole_diffusion.demo.judge"]]
