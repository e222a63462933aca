"""Ray Tune search over atrous rates, Multi-Grid and crop size; each trial is one distributed Ray Train run.

Nothing is imported eagerly so `python -m tuning.search_rates --help` stays fast.
"""
