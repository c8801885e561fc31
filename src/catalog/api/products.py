"""Routes of /api/v1/products: HTTP in, the products service, HTTP out. No SQL, no Redis here."""

from __future__ import annotations

import re
from typing import Any

from flask import Response, g, request
from flask_openapi3.blueprint import APIBlueprint
from flask_openapi3.models.tag import Tag
from pydantic import ValidationError
from werkzeug.exceptions import BadRequest

from catalog.api.schemas import (
    PRODUCT_PATCH,
    ProblemDetail,
    Product,
    ProductIn,
    ProductListQuery,
    ProductPage,
    ProductPath,
    merge_patch,
)
from catalog.errors import Problem, validation_problem
from catalog.products import Precondition, request_fingerprint, service

JSON_TYPES: dict[str, tuple[str, ...]] = {
    "POST": ("application/json",),
    "PUT": ("application/json",),
    "PATCH": ("application/merge-patch+json", "application/json"),
}
# 1-255 visible ASCII characters; the API document states the same pattern.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]{1,255}$"
IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)

products_tag = Tag(name="products", description="The product catalog")
api = APIBlueprint("products", __name__, url_prefix="/api/v1", abp_tags=[products_tag])

Responses = dict[str | int, Any]
PROBLEMS: Responses = {status: ProblemDetail for status in (400, 401, 403, 413, 415, 429, 503)}
READ_RESPONSES: Responses = {**PROBLEMS, 404: ProblemDetail}
WRITE_RESPONSES: Responses = {**READ_RESPONSES, 409: ProblemDetail, 412: ProblemDetail}


class UnsupportedMediaType(Problem):
    """The body is not of a type this endpoint reads."""

    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class MalformedJson(Problem):
    """The body is not valid JSON."""

    status, slug, title = 400, "malformed-json", "Malformed JSON"


class InvalidRequest(Problem):
    """A header or the body breaks a rule of the API (the body: a JSON object, as the schemas say)."""

    status, slug, title = 422, "validation-error", "Validation failed"


@api.before_request
def read_json_body() -> None:
    """415 for a body that is not JSON, 400 for JSON that does not parse, 422 for JSON that is not an
    object (`null`, or a string that itself holds JSON, which flask-openapi3 would otherwise decode a second
    time); before any validation."""
    accepted = JSON_TYPES.get(request.method)
    if accepted is None:
        return
    if request.mimetype not in accepted:
        raise UnsupportedMediaType(f"Send the body as {' or '.join(accepted)}.")
    try:
        body = request.get_json(force=True)  # cached: validation reads this same value
    except BadRequest:
        raise MalformedJson("The request body is not valid JSON.") from None
    except RecursionError:  # RFC 8259 section 9 lets a parser limit nesting; Python's json does
        raise MalformedJson("The request body nests deeper than this service reads.") from None
    if not isinstance(body, dict):
        raise InvalidRequest(
            "The request body must be a JSON object.",
            errors=[{"loc": ["body"], "msg": "Input should be a JSON object"}],
        )


def _json(body: bytes, headers: dict[str, str], status: int = 200) -> Response:
    return Response(body, status=status, mimetype="application/json", headers=headers)


def _if_match() -> Precondition | None:
    """The If-Match precondition as a test on the current version (strong comparison), if one was sent.
    An empty If-Match lists no entity tag and so sets no condition, as an empty If-None-Match does."""
    if not request.headers.get("If-Match", "").strip():
        return None
    if_match = request.if_match
    return lambda version: if_match.is_strong(str(version)) or if_match.star_tag


@api.get(
    "/products", summary="List products", responses={200: ProductPage, **READ_RESPONSES, 422: ProblemDetail}
)
def list_products(query: ProductListQuery) -> Response:
    """Products in a stable order, `limit` per page, optionally only those with `tag`."""
    body, cache_status = service().list(query.limit, query.cursor, query.tag)
    return _json(body, {"X-Cache": cache_status})


@api.get("/products/<product_id>", summary="Get a product", responses={200: Product, **READ_RESPONSES})
def get_product(path: ProductPath) -> Response:
    """One product, with a strong ETag; `If-None-Match` with the current ETag answers 304."""
    version, body, cache_status = service().get(path.product_id)
    etag = f'"{version}"'
    req = request._get_current_object()  # type: ignore[attr-defined]
    # If-None-Match is parsed only when sent (most reads send none).
    if "HTTP_IF_NONE_MATCH" in req.environ and (
        req.if_none_match.contains_weak(version) or req.if_none_match.star_tag
    ):
        return Response(status=304, headers={"ETag": etag, "X-Cache": cache_status})
    return _json(body, {"ETag": etag, "X-Cache": cache_status})


@api.post("/products", summary="Create a product", responses={201: Product, **WRITE_RESPONSES})
def create_product(body: ProductIn) -> Response:
    """Create a product; with `Idempotency-Key`, a repeat of the same request returns the first answer."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 visible ASCII characters.",
            errors=[{"loc": ["header", "Idempotency-Key"], "msg": "must be 1-255 visible ASCII characters"}],
        )
    created = service().create(
        body.model_dump(), g.client.name, key, request_fingerprint(request.get_json(silent=True))
    )
    headers = {"Location": created.location or "", "ETag": '"1"'}
    if created.replayed:
        headers["Idempotent-Replayed"] = "true"
    return _json(created.body, headers, created.status)


@api.put("/products/<product_id>", summary="Replace a product", responses={200: Product, **WRITE_RESPONSES})
def replace_product(path: ProductPath, body: ProductIn) -> Response:
    """Replace every field; `If-Match` with a stale ETag answers 412."""
    version, data = service().replace(path.product_id, body.model_dump(), _if_match())
    return _json(data, {"ETag": f'"{version}"'})


@api.patch("/products/<product_id>", summary="Patch a product", responses={200: Product, **WRITE_RESPONSES})
def patch_product(path: ProductPath) -> Response:
    """Apply an RFC 7396 merge patch (`application/merge-patch+json`); `If-Match` as for PUT."""
    patch = request.get_json(silent=True)
    try:
        PRODUCT_PATCH.validate_python(patch)
    except ValidationError as error:
        return validation_problem(error, "body")

    def change(current: dict[str, Any]) -> dict[str, Any]:
        return ProductIn.model_validate(merge_patch(current, patch)).model_dump()

    try:
        version, data = service().patch(path.product_id, change, _if_match())
    except ValidationError as error:
        return validation_problem(error, "body")
    return _json(data, {"ETag": f'"{version}"'})


@api.delete("/products/<product_id>", summary="Delete a product", responses={204: None, **WRITE_RESPONSES})
def delete_product(path: ProductPath) -> Response:
    """Delete a product; then GET answers 404."""
    service().delete(path.product_id, _if_match())
    return Response(status=204)
