"""The layout stays readable: a few root modules, documented packages, imports only downwards."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Higher layers may import lower ones, never the reverse (README "Layout"). Same-rank packages
# (evaluation, reporting) may not import each other.
RANK = {"common": 0, "model_loader": 1, "nlp_analyzer": 1, "machine": 2, "pruners": 2, "runtime": 3,
        "environments": 4, "controller": 5, "evaluation": 6, "reporting": 6, "serving": 6, "modes": 7,
        "adaptive_pruning": 8}
PACKAGES = ("common", "machine", "pruners", "runtime", "environments", "controller", "evaluation", "reporting",
            "modes", "serving")


def project_modules() -> list[Path]:
    files = [p for p in ROOT.glob("*.py")]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def owner(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_tops(path: Path) -> set[str]:
    """Top-level project names imported anywhere in the file (function-level imports included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(RANK)


def test_root_holds_at_most_six_modules():
    assert len(list(ROOT.glob("*.py"))) <= 6, sorted(p.name for p in ROOT.glob("*.py"))


def test_every_package_says_what_it_owns_and_may_import():
    for package in PACKAGES:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and "May import" in doc, package


def test_imports_only_run_downwards():
    upward = []
    for path in project_modules():
        me = owner(path)
        for name in imported_tops(path) - {me}:
            if RANK[name] >= RANK[me]:
                upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, "\n".join(upward)


def test_the_config_module_imports_no_torch():
    assert not {"torch", "transformers", "numpy"} & {
        n.split(".")[0] for node in ast.walk(ast.parse((ROOT / "common" / "config.py").read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])}


def package_folders() -> list[Path]:
    """Every package and sub-package (a folder with an __init__.py) of the project."""
    return [init.parent for package in PACKAGES for init in sorted((ROOT / package).rglob("__init__.py"))]


def test_no_package_is_a_hall():
    """A newcomer finds a concept by its package: none over 12 modules or about 2,500 lines (sub-packages counted
    apart), none above a fifth of the code, and every sub-package says what it owns."""
    sizes = {}
    for folder in package_folders():
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        sizes[folder] = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in folder.glob("*.py"))
        assert len(modules) <= 12, (folder, len(modules))
        assert sizes[folder] <= 2700, (folder, sizes[folder])     # "about 2,500"
        assert ast.get_docstring(ast.parse((folder / "__init__.py").read_text())), folder
    total = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in project_modules())
    assert all(n <= 0.2 * total for n in sizes.values()), {str(k.relative_to(ROOT)): round(n / total, 3)
                                                           for k, n in sizes.items()}
