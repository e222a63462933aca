"""The import structure docs/design.md draws: deeplab <- export <- cluster <- tuning, no circle between project
modules (function-level imports included, so a lazy import cannot hide one), and no Ray or ONNX in deeplab."""
import ast
import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("deeplab", "export", "cluster", "tuning")
LAZY_PACKAGES = ("deeplab", "deeplab.data")  # packages whose names load their modules on first use


def _modules() -> dict:
    mods = {}
    for package in PACKAGES:
        for f in (ROOT / package).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _targets(name: str, path: Path, mods: dict, node) -> list:
    """The modules one import statement of ``name`` loads: project modules by name (``from pkg import mod`` is
    ``pkg.mod``), others by their full dotted name."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
    module = ".".join(base + ([node.module] if node.module else []))
    subs = [f"{module}.{a.name}" for a in node.names]
    lazy = [_lazy_home(module, a.name) for a in node.names]  # a package's name that loads its module on first use
    return ([t for t in subs if t in mods] + [t for t in lazy if t]
            + ([module] if any(t not in mods for t in subs) else []))


def _lazy_home(package: str, name: str):
    """The module a package's ``__getattr__`` loads for ``name`` (deeplab's and deeplab.data's ``_LAZY`` tables:
    ``from deeplab.data import normalize`` loads deeplab.data.transforms, and torch with it), or None."""
    if package not in LAZY_PACKAGES:
        return None
    table = getattr(importlib.import_module(package), "_LAZY", {})
    return importlib.util.resolve_name(table[name], package) if name in table else None


def _imports(name: str, path: Path, mods: dict) -> set:
    """Every module ``name`` imports anywhere in its file: project modules by name, others by top package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for target in _targets(name, path, mods, node):
            while target not in mods and "." in target:
                target = target.rsplit(".", 1)[0]
            found.add(target)
    found.discard(name)
    return found


def test_packages_import_only_those_below_them_and_deeplab_no_ray_or_onnx():
    mods = _modules()
    rank = {p: i for i, p in enumerate(PACKAGES)}
    for name, path in mods.items():
        for target in _imports(name, path, mods):
            top = target.split(".")[0]
            assert rank.get(top, -1) <= rank[name.split(".")[0]], f"{name} imports {target} (above it)"
            if name.startswith(("deeplab", "export")):
                assert top != "ray", f"{name} imports Ray"
            if name.startswith("deeplab"):
                assert top not in ("onnx", "onnxruntime", "tensorrt", "openvino"), f"{name} imports {top}"


def test_no_import_circle_between_project_modules():
    mods = _modules()
    graph = {name: {t for t in _imports(name, path, mods) if t in mods} for name, path in mods.items()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", "import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt])
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


UPPER = ("export", "cluster", "tuning")


def _upper_sections() -> dict:
    """Section name -> class name of every config section the packages above deeplab register."""
    from deeplab.config import OWN_SECTIONS, SECTION_CLASSES

    for package in UPPER:
        __import__(package)
    return {name: cls.__name__ for name, cls in SECTION_CLASSES.items() if name not in OWN_SECTIONS}


def test_deeplab_declares_no_upper_layers_config_section():
    """The vocabulary follows the arrows too: deeplab holds the config machinery and its own sections; each
    package above it declares its sections next to its code. Fails if a deeplab module defines one of their
    classes, or a module of deeplab/config/ (or deeplab/train_batch.py) names one of their sections."""
    upper = _upper_sections()
    assert {"cluster", "tune", "export", "segment", "serve"} <= set(upper)
    for path in (ROOT / "deeplab").rglob("*.py"):
        tree = ast.parse(path.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        assert not defined & set(upper.values()), f"{path.relative_to(ROOT)} defines {defined & set(upper.values())}"
    machinery = sorted((ROOT / "deeplab" / "config").glob("*.py")) + [ROOT / "deeplab" / "train_batch.py"]
    assert len(machinery) >= 5, machinery  # the package's modules are where this test looks
    for path in machinery:
        words = {n.value for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        named = sorted(s for s in upper for w in words if w == s or w.startswith(f"{s}.") or f" {s}." in w)
        assert not named, f"{path.relative_to(ROOT)} names the sections {named}"


def test_importing_deeplab_alone_registers_only_its_own_sections():
    """A process that imports deeplab only knows model, data, train and inference; the rest appear when their
    package is imported (deeplab's commands import none: tests/test_config.py runs deeplab.evaluate so)."""
    import subprocess
    import sys

    code = ("import deeplab.config as c; print(sorted(c.SECTION_CLASSES)); "
            "import export, cluster, tuning; print(sorted(c.SECTION_CLASSES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    alone, everything = out.splitlines()
    assert alone == str(sorted(["model", "data", "train", "inference"]))
    assert everything == str(sorted(["model", "data", "train", "inference", "export", "cluster", "segment",
                                     "serve", "tune"]))


MAX_FUNCTION_LINES = 60


def test_no_function_in_product_code_is_longer_than_60_lines():
    """A reader holds a function in their head (docs/design.md: functions < 60 lines); nested functions and classes
    count toward the function that holds them, so a class defined inside a function is no way around it."""
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == [], "functions over 60 lines: " + "; ".join(long)


SERVING = ("cluster.serve", "cluster.serve_batch", "cluster.segment", "cluster.bench_serve", "cluster.infer")


def test_serving_and_batch_inference_never_import_training():
    """Serving, batch inference and their benchmark reach Ray through cluster.ray_session and storage through
    cluster.storage, not through cluster.train: checked over everything they import, directly or through
    another project module, function-level imports included."""
    mods = _modules()
    graph = {name: {t for t in _imports(name, path, mods) if t in mods} for name, path in mods.items()}
    for start in SERVING:
        trail, todo = {start: [start]}, [start]
        while todo:
            node = todo.pop()
            for nxt in graph[node] - trail.keys():
                trail[nxt] = trail[node] + [nxt]
                todo.append(nxt)
        assert "cluster.train" not in trail, "serving imports training: " + " -> ".join(trail["cluster.train"])


def _loaded_at_import(mods: dict) -> dict:
    """Module -> every module importing it loads (its module-level imports, through project modules): the
    project's by name, the others by their full dotted name."""
    direct = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        top = [n for stmt in tree.body if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))]
        direct[name] = {t for node in top for t in _targets(name, path, mods, node)}

    def closure(name, seen):
        for target in direct.get(name, ()):
            for owner in [".".join(target.split(".")[:i]) for i in range(1, target.count(".") + 2)]:
                if owner not in seen:
                    seen.add(owner)
                    closure(owner, seen)
        return seen

    return {name: closure(name, {name}) for name in mods}


def test_an_import_inside_a_function_keeps_a_package_out_of_the_files_import():
    """docs/design.md: imports stand at the top of a file unless heavy or optional. So an import inside a function
    must keep something out of the file's own import: a module outside the standard library (torch, ray.data,
    onnxruntime, openvino, ...) that importing the file does not load already, directly or through the project
    modules it imports. One that only repeats what the file loads, or loads the standard library, belongs at the
    top of the file (this rule moved 139 of them there)."""
    mods = _modules()
    loaded = _loaded_at_import(mods)
    stdlib = sys.stdlib_module_names | {"__future__"}

    def outside_stdlib(names):
        return {n for n in names if n.split(".")[0] not in stdlib and n.split(".")[0] not in PACKAGES}

    misplaced = []
    for name, path in mods.items():
        mine = outside_stdlib(loaded[name])
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in (n for stmt in fn.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))):
                targets = _targets(name, path, mods, node)
                if any(name in loaded.get(t, ()) for t in targets):
                    continue  # breaks a circle: the module it imports imports this one when loaded
                wanted = set()
                for target in targets:
                    wanted |= outside_stdlib(loaded[target] if target in mods else {target})
                if not any(all(m != w and not m.startswith(w + ".") for m in mine) for w in wanted):
                    misplaced.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not misplaced, f"imports inside functions that keep nothing out: {sorted(set(misplaced))}"
