"""Helpers the chapters use that must also work outside the book's tooling.

:func:`glue` records a value for the rendered book (myst-nb's ``glue``) when
myst-nb is installed, and otherwise just shows it, so that a chapter runs
unchanged in Colab or a plain Jupyter kernel, where myst-nb is absent.
"""

from __future__ import annotations

from typing import Any

__all__ = ["glue"]


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
