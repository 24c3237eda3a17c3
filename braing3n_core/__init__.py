"""BrainG3N core: data, models, training stages, probes, metrics and privacy.

Nothing in this package imports Flower; `server/` and `client/` translate Flower messages into calls
to the functions defined here.
"""

__version__ = "0.1.0"
