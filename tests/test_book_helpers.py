"""mtl_utils.book: glue without myst-nb (as in Colab) and quiet_stderr.

Runs on both stacks: the pinned one (myst-nb installed, hidden here by putting
``None`` in ``sys.modules``, which makes ``import myst_nb`` raise ImportError) and
Colab's (.ci/colab_stack.sh, where myst-nb is absent)."""

import os
import subprocess
import sys
import textwrap
import types

import pytest

from mtl_utils import book


@pytest.fixture
def no_myst_nb(monkeypatch):
    monkeypatch.setitem(sys.modules, "myst_nb", None)


@pytest.fixture
def shown(monkeypatch):
    """What IPython's display() receives (IPython's own function, replaced)."""
    display_module = pytest.importorskip("IPython.display")
    calls = []
    monkeypatch.setattr(display_module, "display", lambda value: calls.append(value))
    return calls


def test_glue_without_myst_nb_displays_the_value(no_myst_nb, shown):
    value = {"mIoU": 0.5}
    book.glue("miou", value)
    assert len(shown) == 1 and shown[0] is value


def test_glue_without_myst_nb_and_display_false_shows_nothing(no_myst_nb, shown):
    book.glue("miou", 0.5, display=False)
    assert shown == []


def test_glue_without_ipython_prints_the_value(no_myst_nb, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "IPython.display", None)
    book.glue("speed", 1.25)
    assert capsys.readouterr().out == "1.25\n"


def test_glue_uses_myst_nb_when_it_is_installed(monkeypatch):
    """myst-nb's glue(name, variable, display) receives the call (a stand-in module
    here, so that the test also runs where myst-nb is absent)."""
    calls = []
    myst_nb = types.ModuleType("myst_nb")
    myst_nb.glue = lambda *a, **k: calls.append((a, k))
    monkeypatch.setitem(sys.modules, "myst_nb", myst_nb)
    book.glue("speed", 1.25, display=False)
    assert calls == [(("speed", 1.25), {"display": False})]


def test_glue_rejects_an_empty_name():
    with pytest.raises(ValueError, match="non-empty string"):
        book.glue("", 1.0)


def run_python(code):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_quiet_stderr_hides_what_c_code_and_python_write_to_stderr():
    """os.write(2, ...) is what C++ logging does: it bypasses sys.stderr."""
    result = run_python(
        """
        import os, sys
        from mtl_utils.book import quiet_stderr
        with quiet_stderr():
            os.write(2, b"from C\\n")
            print("from Python", file=sys.stderr)
        print("after", file=sys.stderr)
        print("stdout")
        """
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("stdout\n", "after\n")


def test_quiet_stderr_shows_what_was_captured_when_the_block_fails():
    result = run_python(
        """
        import os
        from mtl_utils.book import quiet_stderr
        with quiet_stderr():
            os.write(2, b"the reason\\n")
            raise ImportError("broken")
        """
    )
    assert result.returncode == 1
    assert result.stderr.startswith("the reason\n")
    assert "ImportError: broken" in result.stderr


def test_quiet_stderr_restores_the_descriptor():
    before = os.fstat(2)
    with book.quiet_stderr():
        assert os.fstat(2).st_ino != before.st_ino
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_sharp_figures_in_a_kernel_gives_2x_pngs_shown_at_normal_size():
    # Oracle: the PNG's own header (its pixel size) against the width/height
    # metadata the book honours, and the figure size in inches times the DPI
    # (the inline backend trims the white margin, so at most that).
    import base64
    import struct

    import nbclient
    import nbformat

    code = textwrap.dedent(
        """\
        from mtl_utils.book import sharp_figures
        sharp_figures()
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(4, 2.5))
        ax.plot([0, 1], [1, 0])
        plt.show()
        """
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nbclient.NotebookClient(nb, timeout=120).execute()
    (image,) = [o for o in nb.cells[0].outputs if "image/png" in o.get("data", {})]
    png = base64.b64decode(image["data"]["image/png"])
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    shown = image["metadata"]["image/png"]
    assert 0.8 * 4 * book.FIGURE_DPI < shown["width"] <= 4 * book.FIGURE_DPI
    assert 0.8 * 2.5 * book.FIGURE_DPI < shown["height"] <= 2.5 * book.FIGURE_DPI
    # IPython shows the PNG at half its pixels, rounded down (723 px -> 722)
    assert (width // 2, height // 2) == (shown["width"], shown["height"])


def test_sharp_figures_outside_ipython_changes_nothing_but_the_dpi():
    out = run_python(
        "from mtl_utils.book import sharp_figures, FIGURE_DPI\n"
        "import matplotlib\n"
        "import matplotlib.pyplot as plt\n"
        "sharp_figures()\n"
        "print(matplotlib.rcParams['figure.dpi'] == FIGURE_DPI,"
        " matplotlib.get_backend().lower())\n"
    )
    assert out.stdout.split() == ["True", "agg"], out.stderr
