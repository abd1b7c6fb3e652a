"""MLflow as a view of a sweep's own records (Tune's trial results in the sweep's storage).

- `writer`: Tune-agnostic run writer: runs, params, metric rows deduped by step, tags, artifacts, status;
  transient failures (server down, 5xx) vs permanent ones (4xx); retries are MLflow's own client retries.
- `identity`: find, adopt and close a sweep's runs by their tags (one parent per sweep, one run per trial).
- `content`: what goes into a run (which values are metrics, the MLflow step, params, descriptions).
- `callback`: the Ray Tune callback for live logging, off Tune's event loop (a background writer thread).
- `reconcile`: `sweep sync`: bring MLflow level with the sweep's records (idempotent).
"""
