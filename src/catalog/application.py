"""The Flask application class: flask-openapi3's, deciding once per function whether it is a coroutine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask_openapi3.openapi import OpenAPI


class CatalogApp(OpenAPI):
    """Flask asks `ensure_sync` about every hook and view on every request; the answer never changes, so it
    is remembered (about a dozen `inspect` calls less per request)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._synchronous: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """The function itself, or its synchronous wrapper for an `async def`."""
        synchronous = self._synchronous.get(func)
        if synchronous is None:
            synchronous = self._synchronous[func] = super().ensure_sync(func)
        return synchronous
