"""Sphinx configuration of the course book (``make book``; see mclstexp_lite/_book.py).

The builder copies this folder, adds the executed notebooks under ``notebooks/`` and the
generated parts under ``_generated/``, and builds it offline. Notebooks are never run
here (``nb_execution_mode = "off"``); any warning fails the build.
"""

project = "mclstexp_lite"
author = "the mclstexp_lite authors"
html_title = "mclstexp_lite: a hands-on course"

# mclstexp_lite._book: exercise titles as the notebooks write them ("Exercise 02.1 · ...")
extensions = ["myst_nb", "sphinx_exercise", "sphinx_togglebutton", "mclstexp_lite._book"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# the pages show the notebooks as `make tutorials` executed them
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "show"

exclude_patterns = ["_generated", "_build", "**.ipynb_checkpoints"]
root_doc = "index"

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_css_files = ["book.css"]
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "home_page_in_toc": True,
    "navigation_with_keys": False,
}
