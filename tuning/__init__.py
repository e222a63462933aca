"""Ray Tune search over atrous rates, Multi-Grid and crop size; each trial is one distributed Ray Train run.

Only `tuning.config` is imported eagerly (it registers the ``tune`` config section), so
`python -m tuning.search_rates --help` stays fast.
"""
from . import config  # noqa: F401
