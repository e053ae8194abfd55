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
