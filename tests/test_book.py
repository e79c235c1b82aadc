"""The book's structure against its single sources of truth: _config.yml (the
repository URL), _toc.yml (the chapters), references.bib and the glossary."""

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib
import yaml
from nbformat import v4

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
import colab_chapters  # noqa: E402
import setup_cell  # noqa: E402

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())


def toc_files():
    files = [TOC["root"]]
    for part in TOC.get("parts", []):
        files += [c["file"] for c in part["chapters"]]
    return files


CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))


def load(path):
    return json.loads(path.read_text())


def first_code_cell(nb):
    return next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


def chapter_imports(nb):
    """Top-level names of the modules a notebook's code cells import."""
    names = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        lines = "".join(cell["source"]).splitlines()
        code = "\n".join(x for x in lines if not x.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in {
                "__import__",
                "import_module",
            }:
                raise AssertionError(f"dynamic import: {ast.unparse(node)}")
    return names


def runtime_modules():
    """What a reader's machine is sure to have: the standard library, mtl_utils,
    the modules of its runtime dependencies (pyproject.toml's `dependencies`, not
    the extras) and TensorFlow (Colab's own, or the `cpu` extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dists = {"tensorflow", "tensorflow-cpu"} | {
        re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower().replace("_", "-")
        for dep in project["dependencies"]
    }
    modules = {
        module
        for module, owners in packages_distributions().items()
        if any(owner.lower().replace("_", "-") in dists for owner in owners)
    }
    return set(sys.stdlib_module_names) | modules | {"mtl_utils", "tensorflow"}


def test_chapter_imports_are_found_by_ast():
    nb = {
        "cells": [
            {"cell_type": "markdown", "source": ["import myst_nb"]},
            {
                "cell_type": "code",
                "source": ["%matplotlib inline\nimport os.path as p, sys\n"],
            },
            {"cell_type": "code", "source": ["from myst_nb import glue\n"]},
        ]
    }
    assert chapter_imports(nb) == {"os", "sys", "myst_nb"}
    assert {"numpy", "keras", "matplotlib", "pandas", "tensorflow"} <= runtime_modules()
    assert not {"myst_nb", "nbval", "sklearn", "yaml"} & runtime_modules()


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_imports_only_what_mtl_utils_installs(path):
    """A chapter runs in Colab, where no book tooling (myst-nb, jupyter-book) is."""
    extra = chapter_imports(load(path)) - runtime_modules()
    assert not extra, (
        f"{path.name} imports {sorted(extra)}, which pip install mtl_utils does not "
        "install; use mtl_utils.book (e.g. its glue) or add a runtime dependency"
    )


def test_every_toc_entry_exists_and_every_chapter_is_in_the_toc():
    for entry in toc_files():
        matches = list(ROOT.glob(entry + ".*"))
        assert matches, f"_toc.yml lists {entry!r} but no such file exists"
    listed = set(toc_files())
    for chapter in CHAPTERS:
        assert str(chapter.relative_to(ROOT).with_suffix("")) in listed


def chapters_with_pending(pending, reason):
    """Every chapter, those named in ``pending`` as strict xfails: remove a name
    once its chapter is done, since a strict xfail fails as soon as it passes."""
    return [
        pytest.param(
            p, marks=pytest.mark.xfail(p.name in pending, reason=reason, strict=True)
        )
        for p in CHAPTERS
    ]


# Chapters whose owner has yet to run `make setup-cells`.
SETUP_CELL_PENDING: set[str] = set()


@pytest.mark.parametrize(
    "path",
    chapters_with_pending(SETUP_CELL_PENDING, "setup cell pending"),
    ids=lambda p: p.name,
)
def test_every_chapter_starts_with_the_setup_cell_for_the_configured_repository(path):
    """.ci/setup_cell.py holds the one setup cell, with _config.yml's URL."""
    url = CONFIG["repository"]["url"]
    expected = setup_cell.setup_source(url)
    assert first_code_cell(load(path)) == expected, (
        f"{path.name}: setup cell differs from .ci/setup_cell.py with {url}; "
        "run `make setup-cells`"
    )


def test_setup_cell_quiets_tensorflow_before_importing_it():
    setup = setup_cell.setup_source("https://example.org/repo")
    assert 'REPO_URL = "https://example.org/repo"' in setup
    assert re.search(r'if importlib\.util\.find_spec\("mtl_utils"\) is None:', setup)
    assert "git+{REPO_URL}" in setup
    first_import = setup.find("import keras")
    assert -1 < setup.find('os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"') < first_import
    assert -1 < setup.find('os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"') < first_import
    assert -1 < setup.find("with quiet_stderr():") < first_import
    assert "keras.utils.set_random_seed(" in setup


def test_setup_cell_says_what_to_set_when_the_install_fails(tmp_path):
    """Without site-packages (-S) mtl_utils is missing, so the cell runs pip on a
    repository that does not exist; pip fails and the cell names REPO_URL."""
    missing = (tmp_path / "no-such-repo").as_uri()
    result = subprocess.run(
        [sys.executable, "-S", "-c", setup_cell.setup_source(missing)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("RuntimeError: could not install mtl_utils from "), (
        result.stderr[-2000:]
    )
    assert missing in message and "set REPO_URL in this cell" in message


#: What TensorFlow 2.20's full wheel wrote to stderr at a chapter's first XLA
#: compilation, with TF_CPP_MIN_LOG_LEVEL=3 set before the import (recorded).
TF_XLA_NOTICE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written "
    "to STDERR\n"
    "I0000 00:00:1796304817.778044   31397 device_compiler.h:196] Compiled cluster "
    "using XLA!  This line is logged at most once for the lifetime of the process.\n"
)


def executed(*stderr_texts):
    """A notebook as nbclient leaves it: a setup cell, then one cell per text."""
    cells = [v4.new_code_cell(id="setup")]
    for i, text in enumerate(stderr_texts):
        stream = v4.new_output("stream", name="stderr", text=text)
        cells.append(v4.new_code_cell(id=f"c{i}", outputs=[stream]))
    return v4.new_notebook(cells=cells)


def test_colab_check_lets_through_only_the_listed_tensorflow_notices():
    assert colab_chapters.stderr_problems(executed(TF_XLA_NOTICE)) == ([], 2)
    warning = "UserWarning: the layer was called on a float mask\n"
    problems, harmless = colab_chapters.stderr_problems(
        executed(TF_XLA_NOTICE + warning)
    )
    assert harmless == 2 and len(problems) == 1
    assert "cell 1 (id c0)" in problems[0] and "UserWarning" in problems[0]
    assert "Compiled cluster" not in problems[0]
    # a listed line with anything after it is not the listed line
    longer = TF_XLA_NOTICE.replace("process.", "process. Retrying.")
    assert colab_chapters.stderr_problems(executed(longer))[0]


def test_colab_check_ignores_the_setup_cell_but_no_other():
    nb = executed("anything\n", "more\n")
    assert colab_chapters.stderr_problems(nb)[0] != []
    nb.cells[0].outputs, nb.cells[1].outputs = nb.cells[1].outputs, []
    problems, _ = colab_chapters.stderr_problems(nb)
    assert len(problems) == 1 and "more" in problems[0]


# Chapters whose problem-size cell does not state its costs yet.
COSTS_PENDING: set[str] = set()


@pytest.mark.parametrize(
    "path", chapters_with_pending(COSTS_PENDING, "costs pending"), ids=lambda p: p.name
)
def test_problem_size_cell_states_the_cost_of_both_settings(path):
    """Issue 13: the CPU setting's run time measured, the GPU setting's with its
    basis (benchmarks/gpu_estimates.py), and whether it fits a free Colab session."""
    cell = next(
        "".join(c["source"])
        for c in load(path)["cells"]
        if c["cell_type"] == "code" and "# GPU:" in "".join(c["source"])
    )
    comments = re.findall(r"^# (CPU|GPU) setting: (.*(?:\n#   .*)*)", cell, re.M)
    costs = {kind: " ".join(text.split()) for kind, text in comments}
    assert set(costs) == {"CPU", "GPU"}, f"{path.name}: {cell[:300]}"
    assert "measured" in costs["CPU"], costs["CPU"]
    assert "T4" in costs["GPU"] or "measured" in costs["GPU"], costs["GPU"]
    assert "Colab" in costs["GPU"], costs["GPU"]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_skeleton(path):
    nb = load(path)
    markdown = "\n".join(
        "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"
    )
    assert "**What you will learn.**" in markdown
    assert "**Run time.**" in markdown
    assert "## Summary" in markdown and "## Exercises" in markdown
    # a cell sets the problem size, with a GPU-sized alternative in a comment
    assert any(
        c["cell_type"] == "code" and "# GPU:" in "".join(c["source"])
        for c in nb["cells"]
    ), f"{path.name}: no problem-size cell with '# GPU:' alternatives"
    # key claims are checked by hidden assert cells
    hidden = [
        c for c in nb["cells"] if "remove-cell" in c.get("metadata", {}).get("tags", [])
    ]
    assert any("assert" in "".join(c["source"]) for c in hidden), path.name
    # every cell has an id, every code cell was executed, and none failed
    assert all("id" in c for c in nb["cells"])
    for c in nb["cells"]:
        if c["cell_type"] == "code" and c["source"]:
            assert c["execution_count"] is not None, f"{path.name}: unexecuted cell"
            assert not [o for o in c["outputs"] if o["output_type"] == "error"]


def book_sources():
    for path in sorted((ROOT / "book").glob("*.md")):
        yield path, path.read_text()
    for path in CHAPTERS:
        cells = load(path)["cells"]
        yield (
            path,
            "\n".join(
                "".join(c["source"]) for c in cells if c["cell_type"] == "markdown"
            ),
        )


def test_every_citation_key_is_in_references_bib():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    for path, text in book_sources():
        for group in re.findall(r"\{cite:[pt]\}`([^`]+)`", text):
            for key in group.split(","):
                assert key.strip() in keys, f"{path.name} cites unknown key {key!r}"


def test_every_glossary_term_used_is_defined():
    glossary = (ROOT / "book" / "glossary.md").read_text()
    defined = {
        line.strip().lower() for line in glossary.splitlines() if re.match(r"^\S", line)
    }
    for path, text in book_sources():
        for role in re.findall(r"\{term\}`([^`]+)`", text):
            # {term}`term` or {term}`shown text <term>`
            target = re.search(r"<([^>]+)>\s*$", role)
            term = target.group(1) if target else role
            assert term.strip().lower() in defined, (
                f"{path.name}: undefined term {term!r}"
            )


def test_book_builds_with_zero_warnings(tmp_path):
    """The exact oracle for the book: Sphinx with -W turns any warning into failure."""
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("jupyter-book")),
            "build",
            str(ROOT),
            "-W",
            "--keep-going",
            "--path-output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert (tmp_path / "_build" / "html" / "index.html").exists()
