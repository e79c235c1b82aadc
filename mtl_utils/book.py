"""Helpers the chapters use that must also work outside the book's tooling.

:func:`glue` records a value for the rendered book (myst-nb's ``glue``) when
myst-nb is installed, and otherwise just shows it, so that a chapter runs
unchanged in Colab or a plain Jupyter kernel, where myst-nb is absent.
:func:`quiet_stderr` keeps TensorFlow's start-up messages (CUDA plugin registration,
written by C++ straight to the process's stderr) out of a chapter's setup cell.
:func:`sharp_figures` makes a notebook's Matplotlib figures high-resolution PNGs
shown at their normal size, so that they stay sharp on high-DPI screens.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = ["glue", "quiet_stderr", "sharp_figures"]

#: Pixels per inch of the figures as shown; PNGs hold twice as many (retina).
FIGURE_DPI = 100


def glue(name: str, variable: Any, display: bool = True) -> None:
    """Glue ``variable`` under ``name`` for the book, or display it without myst-nb.

    Parameters
    ----------
    name:
        Key that the book's ``{glue:}`` roles refer to.
    variable:
        The value (a number, a string, a figure, ...).
    display:
        Show the value in the cell's output (as myst-nb does).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"glue name must be a non-empty string; received {name!r}")
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        myst_glue = None
    if myst_glue is not None:
        myst_glue(name, variable, display=display)
        return
    if not display:
        return
    try:
        from IPython.display import display as show
    except ImportError:  # a plain Python script
        show = print
    show(variable)


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Hide everything written to stderr inside the block, unless the block fails.

    Importing the full ``tensorflow`` wheel (Colab's) prints CUDA plugin
    registration errors and an absl notice from C++, before ``TF_CPP_MIN_LOG_LEVEL``
    takes effect. They go to file descriptor 2, which Jupyter shows as red text, so
    this redirects the descriptor (and ``sys.stderr``) to a temporary file for the
    duration of the block. If the block raises, what was captured is written to
    ``sys.stderr`` before the exception propagates, so no real error is hidden.

    Examples
    --------
    >>> with quiet_stderr():
    ...     print("not shown", file=sys.stderr)
    """
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as captured:
        saved = os.dup(2)
        text = io.StringIO()
        try:
            os.dup2(captured.fileno(), 2)
            with contextlib.redirect_stderr(text):
                yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace") + text.getvalue())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def sharp_figures() -> None:
    """Show Matplotlib figures as 2x PNGs at their normal size (IPython's "retina").

    Each figure is drawn at ``2 * FIGURE_DPI`` pixels per inch, and the PNG's
    metadata halves its displayed width and height, which Jupyter, Colab and the
    book (myst-nb) honour. Fonts and lines keep their sizes; only the
    resolution doubles. Outside IPython (a plain script) only the DPI is set.
    """
    import matplotlib

    matplotlib.rcParams["figure.dpi"] = FIGURE_DPI
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")
