"""``medbridge serve``: a prediction service with a page that shows why (heat maps per label).

``create_app(run_or_adapter, token=None)`` builds the FastAPI app; :mod:`.decode` reads uploads in memory;
:mod:`.explain` computes per-label heat maps for every method; :mod:`.predictor` loads the method once and
micro-batches concurrent requests."""

from __future__ import annotations


def create_app(*args, **kwargs):
    """See :func:`medbridge.serve.app.create_app` (imported lazily: FastAPI is needed only to serve)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
