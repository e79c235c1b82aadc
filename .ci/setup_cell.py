"""Write the one setup cell into every chapter, with the URL from _config.yml.

Every chapter starts with the same code cell: it installs ``mtl_utils`` from the
book's repository when it is missing (Colab), says what to set when that fails,
sets TensorFlow's variables before TensorFlow is imported, imports Keras with
TensorFlow's C++ start-up messages captured, seeds, and asks for high-resolution
figures. The repository URL lives in
one place, ``repository.url`` in ``_config.yml``; ``make setup-cells`` (this script)
copies it into the chapters, and ``tests/test_book.py`` checks that they agree.

Usage: ``python .ci/setup_cell.py [NOTEBOOK ...]`` (default: every chapter).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))

TEMPLATE = """\
# Setup: install mtl_utils when it is missing (e.g. in Colab), quiet TensorFlow
# *before* it is imported, and seed every random generator.
import importlib.util
import os
import subprocess
import sys

REPO_URL = "URL"  # running a fork? see the README
if importlib.util.find_spec("mtl_utils") is None:
    pip = [sys.executable, "-m", "pip", "install", "-q", f"mtl_utils @ git+{REPO_URL}"]
    if subprocess.run(pip).returncode != 0:
        raise RuntimeError(
            f"could not install mtl_utils from {REPO_URL}: set REPO_URL in this cell "
            "to the URL of the repository that holds this book (your fork), and run "
            "the cell again"
        )
    importlib.invalidate_caches()
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"

from mtl_utils.book import quiet_stderr, sharp_figures

with quiet_stderr():  # TensorFlow's CUDA set-up messages, printed from C++
    import keras

keras.utils.set_random_seed(0)
sharp_figures()  # high-resolution figures, shown at their normal size"""


def repository_url() -> str:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    return config["repository"]["url"]


def setup_source(url: str | None = None) -> str:
    """The setup cell's source, installing from ``url`` (default: _config.yml's)."""
    return TEMPLATE.replace('"URL"', f'"{url or repository_url()}"', 1)


def first_code_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code")


def main(argv: list[str]) -> int:
    source = setup_source()
    paths = [Path(a) for a in argv] or CHAPTERS
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        cell = first_code_cell(nb)
        if cell.source != source:
            cell.source = source
            nbformat.write(nb, path)
            print(f"{path.name}: setup cell written")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
