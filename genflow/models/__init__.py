"""One self-contained file per family; `families.py` is the only place that knows their names."""
