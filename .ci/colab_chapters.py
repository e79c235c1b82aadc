"""Execute chapters top to bottom in a fresh kernel, as a reader in Colab would.

Run by ``.ci/colab_stack.sh`` with the Colab-like environment's Python. Each
chapter runs in a new kernel of this interpreter, with the working directory
``book/`` and none of the variables the Makefile exports (the setup cell has to set
them, as it does in Colab). A chapter fails on any error, and on any output to
stderr in a code cell other than its setup cell (the first code cell): in Colab that
is red text under the cell, such as a warning the chapter does not explain. The one
exception is a short allow-list of informational lines that TensorFlow's C++ code
writes once per process whatever ``TF_CPP_MIN_LOG_LEVEL`` says (``HARMLESS_STDERR``,
each a whole-line pattern with the reason it is harmless); they are counted and
reported, and any other line on stderr still fails the chapter.

Usage: ``python .ci/colab_chapters.py [NOTEBOOK ...]`` (default: every chapter).
With ``COLAB_SAVE_DIR`` set, each executed notebook is written there (to read its
outputs on this stack).
Prints one line per chapter with its wall time; exits 1 if any chapter failed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT = 900  # seconds, as nbval's --nbval-cell-timeout in pyproject.toml
BOOK_TOOLING = ("myst_nb", "jupyter_book", "nbval")
MADE_BY_MAKEFILE = ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "KERAS_BACKEND")
QUIET_KERNEL = {"PYDEVD_DISABLE_FILE_VALIDATION": "1"}  # debugpy notice at start

#: Lines on stderr that do not fail a chapter. TensorFlow 2.20's XLA code logs
#: through absl, and absl writes every message to stderr until absl::InitializeLog()
#: is called (TensorFlow never calls it), so TF_CPP_MIN_LOG_LEVEL=3 in the setup cell
#: does not silence these (measured: a jit-compiled tf.function prints both lines with
#: it set before the import). Both are printed at most once per process, at the
#: first XLA compilation, which Keras' fit() does on the TensorFlow backend
#: (jit_compile="auto"). Each pattern must match a whole line.
HARMLESS_STDERR = {
    "absl's notice that it logs to stderr before initialisation": re.compile(
        r"WARNING: All log messages before absl::InitializeLog\(\) is called "
        r"are written to STDERR"
    ),
    "XLA's once-per-process notice that it compiled a cluster": re.compile(
        r"I\d{4} [\d:.]+ +\d+ device_compiler\.h:\d+\] Compiled cluster using XLA!"
        r"  This line is logged at most once for the lifetime of the process\."
    ),
}


def first_lines(text: str, n: int = 6) -> str:
    lines = text.strip().splitlines()
    more = f"\n      ... ({len(lines) - n} more lines)" if len(lines) > n else ""
    return "\n".join("      " + line for line in lines[:n]) + more


def unexplained_lines(text: str) -> tuple[list[str], int]:
    """The non-blank lines of ``text`` that no HARMLESS_STDERR pattern matches,
    and the number of lines that one does."""
    lines = [line for line in text.splitlines() if line.strip()]
    unexplained = [
        line
        for line in lines
        if not any(p.fullmatch(line.strip()) for p in HARMLESS_STDERR.values())
    ]
    return unexplained, len(lines) - len(unexplained)


def stderr_problems(nb) -> tuple[list[str], int]:
    """Cells other than the setup cell that wrote to stderr (allow-listed lines
    left out), and the number of allow-listed lines."""
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    problems, harmless = [], 0
    for i, cell in code[1:]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                unexplained, allowed = unexplained_lines(out["text"])
                harmless += allowed
                if unexplained:
                    problems.append(
                        f"  cell {i} (id {cell.get('id')}) wrote to stderr:\n"
                        + first_lines("\n".join(unexplained))
                    )
    return problems, harmless


def run_chapter(path: Path) -> tuple[list[str], int]:
    """Execute one notebook; return its problems (empty when it passed) and the
    number of allow-listed stderr lines."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "book")}},
    )
    problems = []
    try:
        client.execute()
    except CellExecutionError as err:
        failed = next(
            (
                (i, c)
                for i, c in enumerate(nb.cells)
                if c.cell_type == "code"
                and any(o.get("output_type") == "error" for o in c.get("outputs", []))
            ),
            (None, None),
        )
        index, cell = failed
        error = next(
            (o for o in (cell or {}).get("outputs", []) if o["output_type"] == "error"),
            None,
        )
        where = f"cell {index} (id {cell.get('id')})" if cell else "a cell"
        what = f"{error['ename']}: {error['evalue']}" if error else str(err)[-500:]
        problems.append(f"  {where} raised {what}")
    except (CellTimeoutError, DeadKernelError) as err:  # the next chapter still runs
        problems.append(f"  {type(err).__name__}: {str(err).splitlines()[0]}")
    on_stderr, harmless = stderr_problems(nb)
    problems += on_stderr
    if os.environ.get("COLAB_SAVE_DIR"):
        nbformat.write(nb, Path(os.environ["COLAB_SAVE_DIR"]) / path.name)
    return problems, harmless


def main(argv: list[str]) -> int:
    tooling = [m for m in BOOK_TOOLING if importlib.util.find_spec(m) is not None]
    if tooling:
        print(f"book tooling installed here ({', '.join(tooling)}); Colab has none")
        return 2
    for name in MADE_BY_MAKEFILE:
        os.environ.pop(name, None)
    os.environ.update(QUIET_KERNEL)
    paths = [Path(a) for a in argv] or CHAPTERS
    failed = 0
    start = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        problems, harmless = run_chapter(path)
        status = "FAILED" if problems else "passed"
        note = f" ({harmless} allow-listed TF lines on stderr)" if harmless else ""
        print(
            f"{path.name}: {status} in {time.perf_counter() - t0:.0f} s{note}",
            flush=True,
        )
        for problem in problems:
            print(problem, flush=True)
        failed += bool(problems)
    total = time.perf_counter() - start
    print(f"{len(paths)} chapters in {total:.0f} s")
    print(f"chapters: {len(paths) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
