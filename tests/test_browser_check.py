"""The browser check's page checks against the renderer itself: a tiny notebook book
is built with Sphinx and MyST-NB (the book's own renderer), and the check must report
exactly the defects that the build really has."""

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat import v4

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / ".ci"))
import browser_check  # noqa: E402

# Chapter 5's paragraph as committed in 0f502ae: the line that starts with "%" is a
# MyST comment, so the page jumps from "averaged over the seeds, in" to "deviation".
CHAPTER_5 = """\
Each run is scored by $\\Delta_m$ (the "drop" convention of chapter 1: the mean
relative change of every metric against the single-task networks' metrics averaged
over the seeds, in
%, **lower is better**), and each method is reported as the mean ± standard
deviation over seeds. Scoring each run against the single-task network of its own
seed instead would add that one network's luck to every run of the seed.
"""
LOST = "%, **lower is better**), and each method is reported as the mean ± standard"
# The same paragraph with the percent sign kept on the line before it.
CHAPTER_5_FIXED = CHAPTER_5.replace("seeds, in\n%,", "seeds, in %,\n")

CONF = """\
extensions = ["myst_nb"]
html_theme = "sphinx_book_theme"
html_sourcelink_suffix = ""  # as Jupyter Book: _sources/page.ipynb
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]  # no colon_fence: ':::' stays text
"""
# A one-pixel PNG as a notebook output.
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAA"
    "AABJRU5ErkJggg=="
)


def figure_cell(**mystnb):
    output = v4.new_output("display_data", data={"image/png": PNG})
    cell = v4.new_code_cell("plot()", outputs=[output])
    if mystnb:
        cell.metadata["mystnb"] = mystnb
    return cell


def build(tmp_path: Path, markdown: str, *cells) -> Path:
    """Build a one-page notebook book; returns the HTML output folder."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "conf.py").write_text(CONF)
    notebook = v4.new_notebook(
        cells=[v4.new_markdown_cell("# A chapter\n\n" + markdown), *cells]
    )
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, source / "index.ipynb")
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-q", "-b", "html", str(source), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def chapter_5(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("chapter_5")
    site = build(
        tmp_path,
        CHAPTER_5 + "\n:::{note}\nA note without colon_fence.\n:::\n",
        figure_cell(),
        figure_cell(
            figure={"caption": "Loss curves of both tasks.", "name": "fig-loss"},
            image={"alt": "Two falling loss curves"},
        ),
    )
    yield site
    shutil.rmtree(tmp_path)


def test_the_renderer_drops_the_percent_line(chapter_5):
    # The oracle: Sphinx really leaves the line out of the page.
    html = (chapter_5 / "index.html").read_text()
    assert "over the seeds, in" in html
    assert "lower is better" not in html
    assert "deviation over seeds" in html


def test_lost_text_reports_chapter_5s_percent_line(chapter_5):
    report = browser_check.check_static(chapter_5, "index.html")
    assert report.defects["lost text"] == [f"source line not on the page: {LOST!r}"]


def test_lost_text_passes_the_fixed_paragraph(tmp_path):
    site = build(tmp_path, CHAPTER_5_FIXED)
    html = (site / "index.html").read_text()
    assert "lower is better" in html  # the renderer shows the fixed line
    assert "lost text" not in browser_check.check_static(site, "index.html").defects


def test_raw_markup_reports_a_fence_the_parser_does_not_know(chapter_5):
    report = browser_check.check_static(chapter_5, "index.html")
    assert report.defects["raw markup"] == [
        "':::' shown as text",
        "'{note}' shown as text",
    ]


def test_figures_need_a_caption_and_alt_text(chapter_5):
    # myst-nb turns the second cell's metadata into <figure> with <figcaption>;
    # the first output image has neither and its alt text is its file path.
    report = browser_check.check_static(chapter_5, "index.html")
    assert report.notes["figures"] == "2 figures, 1 captioned"
    messages = report.defects["figures"]
    assert len(messages) == 2
    assert messages[0].startswith("figure 1 (") and "has no caption" in messages[0]
    assert "alt text is '_images/" in messages[1]


@pytest.mark.parametrize(
    ("markdown", "rendered", "lost"),
    [
        (
            "one two three four\n%five six seven eight\n",
            "one two three four",
            ["%five six seven eight"],
        ),
        ("one two\nthree four five six\n", "one two three four five six", []),
        # markup breaks the n-grams: the role's text is not compared
        ("a {term}`b c` d e f g\n", "a b c x d e f g", []),
        # a fenced code block is not prose; a line of fewer than 4 words is unchecked
        ("```python\nx = not shown anywhere here\n```\nshort line\n", "", []),
    ],
)
def test_lost_lines_on_hand_made_pages(markdown, rendered, lost):
    assert browser_check.lost_lines(markdown, rendered) == lost


def test_references_report_missing_files_and_anchors(tmp_path):
    (tmp_path / "a.html").write_text(
        '<article class="bd-article"><p id="here">x</p>'
        '<a href="a.html#here">ok</a><a href="#gone">anchor</a>'
        '<a href="b.html">file</a><img src="_images/none.png" alt="A plot">'
        '<a href="https://example.org">external, not followed</a></article>'
    )
    report = browser_check.check_static(tmp_path, "a.html")
    assert report.defects["links"] == [
        "a href='#gone': no such anchor",
        "a href='b.html': no such file",
        "img src='_images/none.png': no such file",
    ]


@pytest.mark.parametrize(
    ("alt", "path_like"),
    [
        ("../_images/c373541b07de.png", True),
        ("figures/allreduce", True),
        ("", True),
        ("plot.SVG", True),
        ("Feature maps of H/32 by W/32 cells, one per head", False),
        ("Three falling loss curves", False),
    ],
)
def test_alt_text_is_a_path_only_when_it_reads_like_one(alt, path_like):
    assert browser_check.is_path_like(alt) is path_like
