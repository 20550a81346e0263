"""One module per study; each writes its records under ``results/`` (or a run directory)."""
