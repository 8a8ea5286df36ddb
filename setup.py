"""deepspeed-acco: ACCO (Accumulate While You Communicate) as a DeepSpeed ZeRO-1 extension.

Declarative: nothing here imports torch or DeepSpeed. Install torch first (on CPU machines
``pip install torch==2.13.0``), then ``pip install -e .[dev]`` (``[mpi]`` for MPI launchers).
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "deepspeed_acco" / "__init__.py").read_text(), re.M).group(1)

setup(
    name="deepspeed-acco",
    version=VERSION,
    description="ACCO (Accumulate While You Communicate) for DeepSpeed ZeRO-1: overlap gradient communication "
    "and the sharded optimizer step with the next gradients' computation",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["deepspeed_acco", "deepspeed_acco.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # deepspeed_acco/integration.py touches DeepSpeed internals checked against 0.19.x.
        "deepspeed>=0.19,<0.20",
        "pydantic>=2",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        "examples": ["transformers>=4.40", "datasets>=2.18", "accelerate>=0.30", "tokenizers", "tqdm",
                     "matplotlib"],
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6", "ruff>=0.5", "transformers>=4.40",
                "datasets>=2.18", "accelerate>=0.30", "tokenizers", "tqdm", "matplotlib",
                # the documentation site: mkdocs build --strict in .ci/run, tests/test_docs.py (reads mkdocs.yml
                # and applies its exclude_docs as MkDocs does, with pathspec)
                "mkdocs>=1.6", "mkdocs-material>=9.5", "pyyaml", "pathspec>=0.11"],
    },
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
