"""Serve MathJax from the built site itself, so the book works offline.

Sphinx loads MathJax 3 from a CDN by default (``mathjax_path``); offline, every formula
then shows as raw TeX. This extension points ``mathjax_path`` at
``_static/mathjax/tex-mml-chtml.js`` and copies MathJax 3's ``es5`` bundle there after
the build. The bundle comes from the ``mathjax`` package that PyPI's
``django-static-mathjax`` installs (pinned in requirements.txt; it has no dependencies
and, despite its name, needs no Django).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ExtensionError

#: The combined component the site loads (TeX and MathML input, CommonHTML output).
ENTRY = "tex-mml-chtml.js"
#: Where MathJax lands in the site, relative to ``_static``.
TARGET = "mathjax"
#: The other combined components (one each is a megabyte or two) that the site never
#: loads; everything else (extensions, fonts, accessibility) is loaded on demand.
UNUSED = ("tex-chtml*.js", "tex-svg*.js", "tex-mml-svg.js", "mml-*.js", "node-main.js")


def mathjax_bundle() -> Path:
    """The installed MathJax 3 ``es5`` folder (it holds ``tex-mml-chtml.js``)."""
    try:
        import mathjax
    except ImportError as error:
        raise ExtensionError(
            "local_mathjax: the Python package 'mathjax' is not installed; expected "
            "django-static-mathjax from requirements.txt (run `make book`)"
        ) from error
    bundle = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (bundle / ENTRY).is_file():
        raise ExtensionError(
            f"local_mathjax: {bundle} has no {ENTRY}; expected MathJax 3's es5 bundle "
            "(django-static-mathjax 3.x)"
        )
    return bundle


def use_local_mathjax(app: Sphinx, config: Config) -> None:
    mathjax_bundle()  # fail at the start of the build, not after it
    config.mathjax_path = f"{TARGET}/{ENTRY}"


def copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    shutil.copytree(
        mathjax_bundle(),
        Path(app.outdir) / "_static" / TARGET,
        ignore=shutil.ignore_patterns(*UNUSED),
        dirs_exist_ok=True,
    )


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", use_local_mathjax)
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
