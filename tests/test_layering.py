"""The import structure docs/design.md draws: deeplab <- export <- cluster <- tuning, no circle between project
modules (function-level imports included, so a lazy import cannot hide one), and no Ray or ONNX in deeplab."""
import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("deeplab", "export", "cluster", "tuning")


def _modules() -> dict:
    mods = {}
    for package in PACKAGES:
        for f in (ROOT / package).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path, mods: dict) -> set:
    """Every module ``name`` imports anywhere in its file: project modules by name, others by top package."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            subs = [f"{module}.{a.name}" for a in node.names]
            targets = [t for t in subs if t in mods] + ([module] if any(t not in mods for t in subs) else [])
        else:
            continue
        for target in targets:
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
