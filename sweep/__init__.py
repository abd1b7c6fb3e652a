"""fwsweep: hyperparameter sweeps of fast-weight recurrent networks on Ray Tune, tracked in MLflow.

Kept import-light on purpose: `import sweep` must not pull in torch, Ray or MLflow.
"""

__version__ = "0.1.0"
