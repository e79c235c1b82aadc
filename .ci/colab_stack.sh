#!/usr/bin/env bash
# The chapters on Colab's stack: full `tensorflow` wheel, Colab's Keras, no book
# tooling, and mtl_utils installed from a wheel with its runtime dependencies only.
#   1. build .venv-colab from .ci/colab-requirements.txt (once; again when it changes)
#   2. build a wheel of this checkout and install it; pip must change nothing else
#   3. run the unit tests of the Keras-layer wrappers (version-aware) and mtl_utils.book
#   4. execute every chapter top to bottom in a fresh kernel (.ci/colab_chapters.py):
#      any error, or any stderr output outside the setup cell, fails the step
# Usage: .ci/colab_stack.sh [NOTEBOOK ...]   (default: every chapter)
# COLAB_KERAS=3.10.0 .ci/colab_stack.sh builds .venv-colab-keras3.10.0 with that Keras.
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
REQ=.ci/colab-requirements.txt
VENV=.venv-colab${COLAB_KERAS:+-keras$COLAB_KERAS}
BIN=$VENV/bin
STAMP=$VENV/.installed
start=$SECONDS

if [ ! -f "$STAMP" ] || [ "$REQ" -nt "$STAMP" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$BIN/python" -m pip install --quiet --upgrade pip
    # with COLAB_KERAS, that Keras replaces the pinned one
    grep -v "^keras==" "$REQ" > "$VENV/requirements.txt"
    "$BIN/python" -m pip install --quiet -r "$VENV/requirements.txt" \
        "keras==${COLAB_KERAS:-$(sed -n 's/^keras==//p' "$REQ")}"
    touch "$STAMP"
fi
echo "colab stack: environment ready after $((SECONDS - start)) s"

dist=$(mktemp -d)
trap 'rm -rf "$dist"' EXIT
# built from a copy of the package's sources (a build in place leaves build/ behind)
mkdir "$dist/src"
cp -r pyproject.toml README.md mtl_utils "$dist/src/"
find "$dist/src" -name __pycache__ -prune -exec rm -rf {} +
"$BIN/python" -m pip wheel --quiet --no-deps --wheel-dir "$dist" "$dist/src"
"$BIN/python" -m pip uninstall --quiet --yes mtl_utils 2>/dev/null || true
"$BIN/python" -m pip freeze --exclude mtl_utils > "$dist/before.txt"
"$BIN/python" -m pip install --quiet "$dist"/mtl_utils-*.whl
"$BIN/python" -m pip freeze --exclude mtl_utils > "$dist/after.txt"
if ! diff "$dist/before.txt" "$dist/after.txt"; then
    echo "installing mtl_utils changed the packages above; Colab's would change too"
    exit 1
fi
"$BIN/python" -I - <<'EOF'
import importlib.metadata as md
import mtl_utils
print("colab stack:", ", ".join(
    f"{p} {md.version(p)}"
    for p in ("tensorflow", "keras", "numpy", "pandas", "matplotlib", "ipykernel")
), "| mtl_utils from", mtl_utils.__file__)
assert "site-packages" in mtl_utils.__file__, "mtl_utils must come from the wheel"
EOF

# Unit tests that depend on the Keras version, with the installed wheel (pytest's
# rootdir conftest only; pyproject's nbval options do not apply without nbval).
"$BIN/pytest" -q -p no:cacheprovider -o addopts="" \
    tests/test_augment.py tests/test_book_helpers.py

"$BIN/python" .ci/colab_chapters.py "$@"
echo "colab stack: done in $((SECONDS - start)) s"
