"""The layout is the architecture: imports run from the edges to the core, CLIs are thin and start fast.

The table below is the README's "Layout" section as data: each folder of the package and the folders it
may import (besides itself). A new import that breaks it fails here, naming the module and the import.
"""

import ast
import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jtranspeft.cli.tools import TOOLS  # the one list of tools (setup.py's console scripts read it too)

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jtranspeft"
CORE = ("utils", "models", "peft", "checkpoints", "data")
EDGES = ("training", "eval", "analysis", "cli")
MAY_IMPORT = {
    "utils": set(),
    "models": {"utils"},
    "data": {"utils"},
    "peft": {"utils", "models"},
    "checkpoints": {"utils", "models", "peft"},
    "inference": {"utils", "models", "peft"},
    "training": {"utils", "models", "peft", "checkpoints", "data"},
    "eval": {"utils", "models", "peft", "checkpoints", "data", "inference"},
    "migration": {"utils", "models", "peft", "checkpoints", "data", "inference", "training", "eval"},
    "analysis": {"utils", "models", "peft", "checkpoints", "data", "inference", "training", "eval", "migration"},
    "experiments": {"utils", "models", "peft", "checkpoints", "data", "inference", "training", "eval", "migration",
                    "analysis"},
    "cli": {"utils", "models", "peft", "checkpoints", "data", "inference", "training", "eval", "migration",
            "analysis", "experiments"},
}


def _modules():
    """(dotted name, folder or None for a top-level module, path) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        folder = parts[1] if len(parts) > 2 else None
        yield name, folder, path


def _imports(name: str, path: Path) -> list[str]:
    """Every jtranspeft module a file imports (absolute and relative), at any depth of the file."""
    found = []
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return [m for m in found if m == "jtranspeft" or m.startswith("jtranspeft.")]


def _folder_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else None


def _import_graph() -> dict[str, set[str]]:
    """{module: the jtranspeft modules it imports}, counting imports inside functions."""
    names = {name for name, _, _ in _modules()}
    return {name: {t for t in _imports(name, path) if t in names and t != name} for name, _, path in _modules()}


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The shortest import chain from ``start`` back to itself (breadth first), or None."""
    parent, queue = {start: None}, [start]
    for module in queue:
        for target in sorted(graph[module]):
            if target == start:
                chain = [module]
                while parent[chain[-1]] is not None:
                    chain.append(parent[chain[-1]])
                return chain[::-1] + [start]
            if target not in parent:
                parent[target] = module
                queue.append(target)
    return None


def test_every_folder_is_in_the_table():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(MAY_IMPORT)


def test_imports_run_downward():
    wrong = []
    for name, folder, path in _modules():
        if folder is None:
            continue  # jtranspeft/__init__.py (lazy) and the python -m shims: checked below
        for target in _imports(name, path):
            other = _folder_of(target)
            if other is not None and other != folder and other not in MAY_IMPORT[folder]:
                wrong.append(f"{name} imports {target} ({folder} may import {sorted(MAY_IMPORT[folder])})")
    assert not wrong, "\n".join(wrong)


def test_the_core_never_imports_training_eval_analysis_or_cli():
    wrong = [f"{name} imports {target}" for name, folder, path in _modules() if folder in CORE
             for target in _imports(name, path) if _folder_of(target) in EDGES]
    assert not wrong, "\n".join(wrong)


def test_only_the_cli_and_the_entry_shims_import_cli_modules():
    shims = {f"jtranspeft.{tool}" for tool in TOOLS}
    wrong = [f"{name} imports {target}" for name, folder, path in _modules()
             if folder != "cli" and name not in shims
             for target in _imports(name, path) if _folder_of(target) == "cli"]
    assert not wrong, "\n".join(wrong)
    top_level = {name for name, folder, _ in _modules() if folder is None} - {"jtranspeft"}
    assert top_level == shims  # the top of the package holds the public API and the python -m entries only


def test_no_import_cycles():
    graph = _import_graph()
    chains = [_cycle_through(graph, name) for name in sorted(graph)]
    cycles = {frozenset(chain): " -> ".join(chain) for chain in chains if chain}
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(cycles.values())


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_answers_without_importing_jax(tool):
    done = _run_python(
        "import sys\n"
        f"from jtranspeft.cli import {tool}\n"
        "try:\n"
        f"    {tool}.main(['--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        "heavy = sorted(m for m in ('jax', 'flax', 'optax', 'torch', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "examples" in done.stdout and f"jtranspeft.{tool}" in done.stdout
    assert "HEAVY []" in done.stdout


@pytest.mark.parametrize("tool", TOOLS)
def test_python_dash_m_and_console_scripts_reach_the_same_main(tool):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", f"jtranspeft.{tool}", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "examples" in done.stdout, done.stderr[-2000:]
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get(f"jtranspeft-{tool}") == f"jtranspeft.cli.{tool}:main"
    assert done.stdout.startswith(f"usage: python -m jtranspeft.{tool} ")


@pytest.mark.parametrize("tool", TOOLS)
def test_a_console_script_names_itself_in_its_usage(tool, tmp_path):
    script = tmp_path / f"jtranspeft-{tool}"  # what pip writes for the entry point
    script.write_text(f"import sys\nfrom jtranspeft.cli.{tool} import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: jtranspeft-{tool} ")


def test_the_public_api_resolves_and_jobs_stay_callable_after_their_shim_is_imported():
    import jtranspeft as jt

    for tool in TOOLS:
        importlib.import_module(f"jtranspeft.{tool}")  # an entry module: it does not rebind jt.<tool>
    for name in jt.__all__:
        assert getattr(jt, name) is not None, name
    from jtranspeft.training.finetune import train

    assert jt.train is train
    with pytest.raises(TypeError, match="RunConfig|positional|cfg"):
        jt.train()  # reached train(cfg): a missing argument, not "module object is not callable"
    assert train.__module__ == "jtranspeft.training.finetune"


def test_every_peft_family_has_its_file_format():
    from jtranspeft.checkpoints.peft_format import FORMATS
    from jtranspeft.peft.family import FAMILIES

    assert set(FORMATS) == set(FAMILIES)
    for name, form in FORMATS.items():
        assert all(callable(getattr(form, part, None)) for part in ("save", "load", "layout")), name
