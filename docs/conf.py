"""Sphinx configuration for the cachedecor documentation."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import cachedecor

project = "cachedecor"
author = "The cachedecor authors"
copyright = "the cachedecor authors"
version = cachedecor.__version__
release = cachedecor.__version__

extensions = ["sphinx.ext.autodoc"]

root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

html_theme = "alabaster"
html_title = f"cachedecor {release}"
