"""Sphinx configuration of the torch_ntk documentation.

Build (from the repository root, after ``pip install -r docs/requirements.txt``)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The gallery (``examples/gallery/``) is executed during the build; ``-D plot_gallery=0``
skips running it.
"""
from __future__ import annotations

import os
import re

from sphinx.util import logging

import torch_ntk

logger = logging.getLogger(__name__)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

project = "torch_ntk"
author = "the torch_ntk developers"
copyright = "2026, the torch_ntk developers"
release = torch_ntk.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip", "auto_examples/*.json",
                    "auto_examples/*.md5"]

# -- Markdown (MyST) --------------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# -- API reference ----------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "none"          # the docstrings give types and shapes; hints add noise
autodoc_default_options = {"members": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_param = False          # keep "x1 (Tensor[N1, *in_shape])" as written
add_module_names = False

# -- Cross-references to PyTorch, NumPy and SciPy ---------------------------------------------
# Intersphinx fetches each project's objects.inv over the network at build time. The build must
# pass with -W where those hosts can't be reached (this repository's CI has no general network
# access), and third-party inventories are not shipped here, so the mapping is enabled only when
# TORCH_NTK_DOCS_ONLINE=1: then :class:`torch.Tensor` and the like become links. Offline the
# same roles render as plain code (unresolved Python references are not warnings unless
# nitpicky mode is on), so pages read the same either way.
intersphinx_mapping = {}
if os.environ.get("TORCH_NTK_DOCS_ONLINE", "0") not in ("", "0"):
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "scipy": ("https://docs.scipy.org/doc/scipy", None),
    }
intersphinx_timeout = 10

# -- Gallery ----------------------------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": os.path.join(ROOT, "examples", "gallery"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",      # execute every plot_*.py
    "ignore_pattern": r"__init__\.py",
    "download_all_examples": False,
    "remove_config_comments": True,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "within_subsection_order": "ExampleTitleSortKey",
    "abort_on_example_error": False,    # a failing example is a build error under -W anyway
    "show_memory": False,
    "min_reported_time": 1,
    "backreferences_dir": None,
    "reset_modules": ("matplotlib",),
}

# -- HTML -------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"torch_ntk {release}"
html_static_path = []
html_show_sourcelink = False
html_theme_options = {
    "navbar_align": "left",
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
    "secondary_sidebar_items": ["page-toc"],
}
html_context = {"default_mode": "light"}


# -- Docstrings -------------------------------------------------------------------------------
# The docstrings write shapes as Tensor[N, *in_shape]; outside ``literals`` reStructuredText
# would read that "*" as the start of emphasis, so it is escaped (only there).
_STAR = re.compile(r"(?<=[\[, (])\*(?=\w)")


def _escape_shape_stars(app, what, name, obj, options, lines):
    parts = "\n".join(lines).split("``")      # a literal may span lines
    for j in range(0, len(parts), 2):          # even parts are outside ``...``
        parts[j] = _STAR.sub(r"\\*", parts[j])
    lines[:] = "``".join(parts).split("\n")


def _check_public_names_documented(app, env):
    """Warn (an error under -W) for a public name that no page of the reference documents."""
    objects = env.get_domain("py").objects
    missing = [name for name in public_names() if name not in objects]
    for name in missing:
        logger.warning("public name %s is not in the API reference (docs/api/)", name)


def public_names() -> list[str]:
    """Every public function and class: torch_ntk.__all__ and the __all__ of its public
    submodules, as fully qualified names."""
    import inspect

    names = []
    for name in torch_ntk.__all__:
        obj = getattr(torch_ntk, name)
        if inspect.ismodule(obj):
            names += [f"torch_ntk.{name}.{sub}" for sub in getattr(obj, "__all__", [])]
        else:
            names.append(f"torch_ntk.{name}")
    return names


def setup(app):
    app.connect("autodoc-process-docstring", _escape_shape_stars, priority=100)  # before napoleon
    app.connect("env-check-consistency", _check_public_names_documented)
