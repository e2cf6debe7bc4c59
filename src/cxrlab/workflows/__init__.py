"""Orchestration: what the CLI commands do, one function per command, on top of the data, model, loss,
engine, evaluation and inference layers, none of which imports from here. ``cli/`` only parses
arguments and calls one of these (``tests/test_layering.py`` checks both directions):

    data        data stats, data split, prepare
    train       train, cv (from a recipe name: the run folder is checked, then experiment / cross_validation)
    catalog     list
    demo        demo
    cross_validation, tuning    compare (and the folds of cv)
    evaluate, predict, heatmap, deploy    the commands that use a trained model
"""

from ..progress import plural  # noqa: F401 (re-exported: cli/ imports only workflows, config and errors)
