#!/usr/bin/env bash
# Every chapter at its GPU setting, on a machine with a GPU: records each chapter's
# wall time (and whether it passed) in gpu_check_times.csv.
#
# Each chapter's problem-size cell pairs a CPU value with a GPU one:
#     IMAGE_SIZE = 32  # GPU: 128
#     # GPU: STRATEGIES += ("mgda_ub", "cagrad")
# This script swaps in the GPU values (the expression after "# GPU:", up to any
# note in words) and runs the chapter top to bottom in a fresh kernel, as
# .ci/colab_chapters.py does (errors and stderr outside the setup cell fail it).
# NYUV2_* keep their CPU values unless NYUV2_ROOT points at the real data.
#
# Usage: benchmarks/gpu_check.sh [NOTEBOOK ...]   (default: every chapter)
# Python: $PYTHON, else .venv-colab/bin/python (.ci/colab_stack.sh builds it), else
# .venv/bin/python. Expect hours in total: see each problem-size cell's estimate.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    PYTHON=.venv/bin/python
    [ -x .venv-colab/bin/python ] && PYTHON=.venv-colab/bin/python
fi
"$PYTHON" -c 'import tensorflow as tf; print("GPUs:", tf.config.list_physical_devices("GPU"))'
"$PYTHON" - "$@" <<'EOF'
import ast
import csv
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat

sys.path.insert(0, ".ci")
from colab_chapters import CHAPTERS, run_chapter  # noqa: E402

LINE = re.compile(r"^(\s*)(#\s*GPU:\s*(.*)|([A-Z_][A-Z0-9_]*)\s*=\s*(.*?)\s*#\s*GPU:\s*(.*))$")


def expression(text):
    """The longest prefix of `text` that is a Python expression."""
    for end in range(len(text), 0, -1):
        try:
            ast.parse(text[:end].strip(), mode="eval")
            return text[:end].strip()
        except SyntaxError:
            continue
    raise ValueError(f"no expression in GPU value {text!r}")


def gpu_source(source):
    out = []
    for line in source.splitlines():
        m = LINE.match(line)
        if m and m.group(3) is not None:  # "# GPU: STATEMENT"
            out.append(m.group(1) + m.group(3))
        elif m and not (m.group(4).startswith("NYUV2") and not os.environ.get("NYUV2_ROOT")):
            out.append(f"{m.group(1)}{m.group(4)} = {expression(m.group(6))}")
        else:
            out.append(line)
    return "\n".join(out)


paths = [Path(a) for a in sys.argv[1:]] or CHAPTERS
rows = []
with tempfile.TemporaryDirectory() as tmp:
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if c.cell_type == "code" and "# GPU:" in c.source)
        cell.source = gpu_source(cell.source)
        print(f"== {path.name}: GPU setting\n{cell.source}", flush=True)
        gpu_path = Path(tmp) / path.name
        nbformat.write(nb, gpu_path)
        start = time.perf_counter()
        problems, _ = run_chapter(gpu_path)
        seconds = time.perf_counter() - start
        print(f"{path.name}: {'FAILED' if problems else 'passed'} in {seconds:.0f} s")
        print("\n".join(problems), flush=True)
        rows.append((path.name, "failed" if problems else "passed", round(seconds)))
with open("gpu_check_times.csv", "w", newline="") as f:
    csv.writer(f).writerows([("chapter", "status", "seconds"), *rows])
print("times written to gpu_check_times.csv")
sys.exit(1 if any(r[1] == "failed" for r in rows) else 0)
EOF
