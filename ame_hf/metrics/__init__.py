"""Metrics bundled as local `evaluate` modules, so evaluation works offline
(`evaluate.load("accuracy")` would fetch the script from the Hub)."""
