"""Orchestration: what the CLI commands do (run, cv, compare, demo, evaluate, predict), on top of the
data, model, loss, engine, evaluation and inference layers, none of which imports from here."""
