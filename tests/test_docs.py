"""The documentation is a map that must lead somewhere: README.md stays short, every relative link and #anchor in
README.md and docs/*.md resolves (as GitHub renders them), and every command they show is one the project has
(tests/entry_points.py COMMANDS, whose --help tests/test_entry_points.py runs in a fresh interpreter)."""
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from entry_points import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 150
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), ![alt](target)
# `python -m pkg.mod` or `python path/to/script.py`, in prose or in a code block
COMMAND = re.compile(r"\bpython3? (?:-m ([A-Za-z_][\w.]*)|([\w/]+\.py)\b)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def pages() -> list:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower-case, punctuation dropped except '-' and '_', each space a '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_'
    return text.replace(" ", "-")


def without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links and headings count."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set:
    """Every anchor of a page: its headings' slugs, a repeated slug numbered -1, -2 ... as GitHub does."""
    seen, found = {}, set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S).splitlines():  # no code blocks
        m = re.match(r"#{1,6} (.+?)\s*#*$", line)
        if m:
            slug = github_slug(m.group(1))
            found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return found


def links(path: Path) -> list:
    return [a or b for a, b in LINK.findall(without_code(path.read_text()))]


@pytest.mark.parametrize("heading,slug", [
    ("The model", "the-model"),
    ("Elastic training on spot nodes", "elastic-training-on-spot-nodes"),
    ("The demo (`make demo`)", "the-demo-make-demo"),
    ("Batch inference: `python -m cluster.segment`", "batch-inference-python--m-clustersegment"),
    ("Figures: `python -m cluster.bench_serve`", "figures-python--m-clusterbench_serve"),
    ("What %limit is a share of", "what-limit-is-a-share-of"),
    ("What adding a backbone, a model format or a command touches",
     "what-adding-a-backbone-a-model-format-or-a-command-touches"),
    ("Backbones: MobileNetV3-Large against ResNet-101", "backbones-mobilenetv3-large-against-resnet-101"),
])
def test_github_slug(heading, slug):
    assert github_slug(heading) == slug


def test_readme_is_a_short_map():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it <= {README_MAX_LINES}"


def test_every_page_the_issue_names_exists():
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    expected = {"configuration.md", "model.md", "data.md", "training.md", "cluster.md", "tuning.md", "export.md",
                "serving.md", "benchmarks.md", "design.md"}
    assert expected <= names, f"missing in docs/: {sorted(expected - names)}"
    readme = (ROOT / "README.md").read_text()
    assert not [n for n in expected if f"(docs/{n})" not in readme], "README's index must link every docs page"


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in pages():
        for target in links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ... not checked here
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(ROOT)} -> {target}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where}: no heading with that anchor")
            elif anchor and dest.suffix != ".md":
                broken.append(f"{where}: an anchor into a file that is not Markdown")
    assert broken == [], "\n".join(broken)


def test_links_are_found_at_all():
    """The checks above mean something only if the pages have links and anchors for them to check."""
    assert len([t for p in pages() for t in links(p) if "#" in t]) >= 20
    assert "the-layers-and-what-each-may-import" in anchors(ROOT / "docs" / "design.md")


def shown_commands() -> dict:
    """Every command a page shows -> the pages showing it, as names of COMMANDS (`export/bench.py`)."""
    found = {}
    for page in pages():
        for module, script in COMMAND.findall(page.read_text()):
            name = (module or script).rstrip(".")
            found.setdefault(name, set()).add(page.relative_to(ROOT).as_posix())
    return found


def test_every_command_shown_is_one_the_project_has():
    """A command is in COMMANDS as `pkg.mod` or as a script path; `python -m export.bench` is the script's module.
    tests/test_entry_points.py runs every COMMANDS entry's --help in a fresh interpreter."""
    known = {name.replace("/", ".").removesuffix(".py") for name in COMMANDS}
    shown = shown_commands()
    assert {"cluster.train", "tuning.search_rates", "export.to_tensorrt", "export/bench.py", "cluster.segment",
            "cluster.serve"} <= set(shown)
    unknown = {name: sorted(where) for name, where in shown.items()
               if name.replace("/", ".").removesuffix(".py") not in known and not name.startswith("tests/")}
    assert unknown == {}, f"commands shown in the docs that tests/entry_points.py does not list: {unknown}"
    for name in (n for n in shown if n.startswith("tests/")):  # `python tests/test_densify.py`: a test file
        assert (ROOT / name).is_file(), name


def test_the_pages_do_not_name_the_old_runtime_module():
    """export/runtime.py became export/model_file.py and export/runners.py: the docs name the new ones."""
    stale = [p.relative_to(ROOT).as_posix() for p in pages() if "export.runtime" in p.read_text()]
    assert stale == []


def shown_flags() -> dict:
    """COMMANDS name -> {flag: pages}: the --flags written after a command on its line (a continued line counts)."""
    by_module = {name.replace("/", ".").removesuffix(".py"): name for name in COMMANDS}
    found = {}
    for page in pages():
        text = page.read_text().replace("\\\n", " ")
        for m in re.finditer(COMMAND.pattern + r"([^\n`]*)", text):
            name = by_module.get((m.group(1) or m.group(2) or "").rstrip(".").replace("/", ".").removesuffix(".py"))
            for flag in FLAG.findall(m.group(3)) if name else ():
                found.setdefault(name, {}).setdefault(flag, set()).add(page.relative_to(ROOT).as_posix())
    return found


def help_text(name: str) -> str:
    argv = [*COMMANDS[name], *(["check"] if name == "deeplab.data" else []), "--help"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240).stdout


def test_every_flag_shown_after_a_command_is_in_its_help():
    """A flag renamed in the code leaves the docs stale; each command's --help, in a fresh interpreter, must
    name every flag the docs write after it."""
    flags = shown_flags()
    assert len(flags) >= 10 and "--num-workers" in flags["cluster.train"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        helps = dict(zip(flags, pool.map(help_text, flags)))
    unknown = {f"{name} {flag}": sorted(where) for name, used in flags.items() for flag, where in used.items()
               if flag not in helps[name]}
    assert unknown == {}, f"flags the docs show that the command's --help does not name: {unknown}"
