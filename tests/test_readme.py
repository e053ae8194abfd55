"""README's snippets run as pasted: its python blocks, in order, in a fresh interpreter, on a tiny model.

The only substitutions: the bundled SmolLM2 becomes a random 2-layer llama with SmolLM2's tokenizer (the
`tiny_model_dir` fixture, so the test takes a minute, not ten), and relative paths resolve in a scratch
directory (``configs/`` still reads the repository's recipes). A name the snippets use without defining it, a
wrong path between two snippets or a changed signature fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    """The contents of README.md's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), flags=re.S)


def test_readme_python_snippets_run_as_pasted(tiny_model_dir, tmp_path):
    blocks = readme_python_blocks()
    assert len(blocks) >= 2, "README lost its library snippets"
    script = "\n".join(blocks)
    assert '"smollm2"' in script
    script = script.replace('"smollm2"', repr(str(tiny_model_dir))).replace('"configs/', f'"{REPO}/configs/')
    (tmp_path / "snippets.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "snippets.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"README snippets failed:\n{script}\n--- stderr ---\n{done.stderr[-4000:]}"
    assert (tmp_path / "runs" / "my_adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "runs" / "merged" / "config.json").is_file()
    assert (tmp_path / "runs" / "q2" / "adapter" / "adapter_model.safetensors").is_file()


def test_readme_performance_table_is_the_one_the_benchmark_results_give():
    """Every speed figure in README's performance block comes from benchmarks/results/*.json: the block equals
    what benchmarks/readme_performance.py makes of them (rerun it with --write after a benchmark)."""
    import importlib.util

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))  # the script imports its neighbour machine.py
    try:
        spec = importlib.util.spec_from_file_location("readme_performance", folder / "readme_performance.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    made = module.block()
    assert module.readme_block(module.README.read_text(encoding="utf-8")) == made
    assert "| A |" in made and "- A: `machine: " in made  # every row names a recorded machine
