"""The request pipeline: one hook before every request and one after, so the order is written down once.

Before: the request id and clock; for /api/, the key (401, each failure counted per client IP: 429 past
that limit), then the client's rate limit (429), then the key's scope (403). After: the RateLimit-*
headers of an /api/ answer, X-Request-ID, the access line and the request metrics.
Per-request state lives on the request's `g` (its id, clock, client and quota), set once each.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, Response, g, request

from catalog.auth import Authenticator
from catalog.limits import Quota, RateLimited, RateLimiter, rate_limit_headers
from catalog.logs import REQUEST_ID, request_ids, write_access_line
from catalog.metrics import RequestMetrics

API_PREFIX = "/api/"


class Pipeline:
    """`start` runs before every request, `finish` after it (also after an error answer)."""

    def __init__(self, authenticator: Authenticator, limiter: RateLimiter, metrics: RequestMetrics) -> None:
        self.authenticator = authenticator
        self.limiter = limiter
        self.metrics = metrics

    def start(self) -> None:
        """Before every request."""
        state: Any = g._get_current_object()
        req: Any = request._get_current_object()  # type: ignore[attr-defined]
        state.started = time.perf_counter()
        offered = req.environ.get("HTTP_X_REQUEST_ID")
        state.request_id = offered if offered and REQUEST_ID.match(offered) else request_ids.next()
        state.client = state.quota = None
        if req.path.startswith(API_PREFIX):
            self._guard(state, req)

    def _guard(self, state: Any, req: Any) -> None:
        try:
            client = self.authenticator.identify(req, self._count_failure)
            state.client = client
            state.quota = self.limiter.limit_client(client)
        except RateLimited as limited:
            state.quota = limited.quota
            raise
        self.authenticator.authorize(client, req.method)

    def _count_failure(self, req: Any) -> None:
        state: Any = g._get_current_object()
        state.quota = self.limiter.limit_auth_failure(req.remote_addr)

    def finish(self, response: Response) -> Response:
        """After every request: headers, the access line, the request metrics."""
        state: Any = g._get_current_object()
        req: Any = request._get_current_object()  # type: ignore[attr-defined]
        request_id = getattr(state, "request_id", None)
        if request_id is None:  # the request failed before `start` ran
            state.started, state.client, state.quota = time.perf_counter(), None, None
            request_id = state.request_id = request_ids.next()
        headers = response.headers
        quota: Quota | None = state.quota
        if quota is not None:
            rate_limit_headers(quota, headers, response.status_code == 429)
        headers.add("X-Request-ID", request_id)
        status = response.status_code
        write_access_line(req, status, state.client, state.started, request_id)
        self.metrics.record(req, status, state.started)
        return response


def init_app(app: Flask) -> None:
    """Register the pipeline's hooks."""
    pipeline = Pipeline(
        app.extensions["catalog.authenticator"],
        app.extensions["catalog.limiter"],
        app.extensions["catalog.request_metrics"],
    )
    app.before_request(pipeline.start)
    app.after_request(pipeline.finish)
