"""catalog: a product catalog REST microservice. `create_app` is the whole wiring, in request order."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from catalog.application import CatalogApp
    from catalog.config import Settings

MAX_BODY_BYTES = 1024 * 1024


def create_app(settings: Settings | None = None) -> CatalogApp:
    """Build the app: logs and errors first, then what a request meets: auth, limits, routes, service."""
    # Imported here so that `catalog.config` and `catalog.logs` load without the metrics modules, which
    # need PROMETHEUS_MULTIPROC_DIR to exist (gunicorn.conf.py checks it first).
    from flask_openapi3.models.info import Info

    from catalog import (
        api,
        auth,
        background,
        cache,
        db,
        errors,
        health,
        limits,
        logs,
        metrics,
        pipeline,
        products,
        tracing,
    )
    from catalog.api.schemas import ProblemDetail
    from catalog.application import CatalogApp
    from catalog.config import Settings

    settings = settings or Settings.from_env()
    app = CatalogApp(
        __name__,
        info=Info(
            title="catalog",
            version=settings.version,
            description="Product catalog API. Errors are RFC 9457 problem bodies; reads are cached.",
        ),
        security_schemes=api.security_schemes(settings.api_key_header),
        validation_error_status=422,
        validation_error_model=ProblemDetail,
        validation_error_callback=api.validation_error_response,
        doc_ui=False,
    )
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    logs.init_app(app)
    errors.init_app(app)
    metrics.init_app(app)
    background.init_app(app)
    db.init_app(app)
    cache.init_app(app)
    auth.init_app(app)
    limits.init_app(app)
    pipeline.init_app(app)
    products.init_app(app)
    api.init_app(app)
    health.init_app(app)
    tracing.init_app(app)
    log = logging.getLogger(__name__)
    log.info("catalog app ready", extra={"pid": os.getpid(), "version": settings.version})
    return app
