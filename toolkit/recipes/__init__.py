"""Recipes: the scripts that build the toolkit's shipped models and data, at the top of the layers.

Each module holds one asset's recipe: a frozen ``*Config`` and
``run(config) -> Path``, runnable as ``python -m toolkit.recipes.NAME``
(the command line is a thin layer over the config, :mod:`toolkit.recipes.common`).
Nothing in the toolkit imports a recipe; notebooks and scripts build the
config and call ``run``.
"""
