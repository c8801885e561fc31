"""The /api/v1 surface, its OpenAPI 3.1 document (/openapi.json) and the interactive page of it (/docs)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import wraps
from typing import Any, get_type_hints

from flask import Response, current_app, json, request
from flask_openapi3.openapi import OpenAPI
from pydantic import BaseModel, ValidationError

from catalog.api import docs
from catalog.api.products import IDEMPOTENCY_KEY_PATTERN, api
from catalog.api.schemas import LOCATION_OF_MODEL, PRODUCT_PATCH, ProductPatch
from catalog.errors import PROBLEM_MIMETYPE, validation_problem

API_KEY_SCHEME = "ApiKey"
BEARER_SCHEME = "Bearer"
HEADER_TEXT = {"schema": {"type": "string"}}
HEADER_INT = {"schema": {"type": "integer"}}
# Answered by gunicorn before a request reaches the app (so without RateLimit-* headers): its limits on the
# request line (4094 bytes) and on header fields (8190 bytes each, 100 of them).
SERVER_LIMIT_RESPONSES = {
    "414": "URI too long: the request line is over the server's limit",
    "431": "Request header fields too large: a header, or their number, is over the server's limit",
}


def validation_error_response(error: ValidationError) -> Response:
    """flask-openapi3's validation failures, as 422 problem bodies located in body, query or path."""
    return validation_problem(error, LOCATION_OF_MODEL.get(error.title))


def security_schemes(header: str) -> dict[str, Any]:
    """The two ways to present an API key."""
    return {
        API_KEY_SCHEME: {"type": "apiKey", "in": "header", "name": header},
        BEARER_SCHEME: {"type": "http", "scheme": "bearer", "description": "The API key as a bearer token"},
    }


def _parameter(name: str, description: str, pattern: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string", **({"pattern": pattern} if pattern else {})},
    }


def openapi_document(app: OpenAPI) -> dict[str, Any]:
    """flask-openapi3's document, finished: problem+json errors, headers, the merge-patch body, security."""
    spec: dict[str, Any] = copy.deepcopy(app.api_doc)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("ValidationErrorModel", None)
    schemas[ProductPatch.__name__] = PRODUCT_PATCH.json_schema(ref_template="#/components/schemas/{model}")
    problem_ref = {"$ref": "#/components/schemas/ProblemDetail"}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            is_api = path.startswith("/api/")
            responses = operation.setdefault("responses", {})
            if is_api:
                operation["security"] = [{API_KEY_SCHEME: []}, {BEARER_SCHEME: []}]
                responses["422"] = {"description": "Validation failed"}
                responses.update(
                    {code: {"description": text} for code, text in SERVER_LIMIT_RESPONSES.items()}
                )
            for status, response in responses.items():
                code = int(status)
                if code >= 400:
                    response["content"] = {PROBLEM_MIMETYPE: {"schema": problem_ref}}
                headers = response.setdefault("headers", {})
                headers["X-Request-ID"] = {"description": "The request's id", **HEADER_TEXT}
                if is_api and status not in SERVER_LIMIT_RESPONSES:
                    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"):
                        headers[name] = {"description": "Rate limit of the calling client", **HEADER_INT}
                if code in (429, 503):
                    headers["Retry-After"] = {"description": "Seconds until a retry can pass", **HEADER_INT}
                if code == 401:
                    headers["WWW-Authenticate"] = {"description": "How to authenticate", **HEADER_TEXT}
                if code == 201:
                    headers["Location"] = {"description": "URL of the new product", **HEADER_TEXT}
                if code == 201 or (code in (200, 304) and "{product_id}" in path):
                    headers["ETag"] = {
                        "description": "Strong ETag: the product version in quotes",
                        **HEADER_TEXT,
                    }
                if method == "get" and code in (200, 304):
                    headers["X-Cache"] = {"schema": {"type": "string", "enum": ["HIT", "MISS", "BYPASS"]}}
            parameters = operation.setdefault("parameters", [])
            if method == "get" and "{product_id}" in path:
                responses["304"] = {"description": "Not modified: If-None-Match holds the current ETag"}
                parameters.append(
                    _parameter("If-None-Match", "Answer 304 if the product still has this ETag")
                )
            if method in ("put", "patch", "delete"):
                parameters.append(
                    _parameter(
                        "If-Match",
                        "Answer 412 unless the product still has this ETag (an empty value: no condition)",
                    )
                )
            if method == "post":
                parameters.append(
                    _parameter(
                        "Idempotency-Key",
                        "Repeat-safe create: 1-255 visible ASCII characters",
                        IDEMPOTENCY_KEY_PATTERN,
                    )
                )
            if method == "patch":
                operation["requestBody"] = {
                    "required": True,
                    "content": {
                        media: {"schema": {"$ref": f"#/components/schemas/{ProductPatch.__name__}"}}
                        for media in ("application/merge-patch+json", "application/json")
                    },
                }
    for name, definition in list(schemas.get(ProductPatch.__name__, {}).pop("$defs", {}).items()):
        schemas.setdefault(name, definition)
    return spec


def _openapi_json() -> Response:
    document = current_app.extensions.get("catalog.openapi")
    if document is None:
        document = json.dumps(openapi_document(current_app))  # type: ignore[arg-type]
        current_app.extensions["catalog.openapi"] = document
    return Response(document, mimetype="application/json")


def validate_simple_inputs(app: OpenAPI) -> None:
    """Views whose inputs are only the path and a query string of single values (reading products)
    validate them with the same models and answer a failure the same way, without flask-openapi3's generic
    per-request wrapper: it probes for every kind of input and for response validation on each call, and
    builds the query's dict from the model's JSON schema (about 9 us of a cached GET's CPU, more of a list
    page's; to be reported upstream). The OpenAPI document is flask-openapi3's, unchanged."""
    for endpoint, view in list(app.view_functions.items()):
        function = getattr(view, "__wrapped__", None)
        if function is None or not endpoint.startswith(f"{api.name}."):
            continue
        inputs = {name: hint for name, hint in get_type_hints(function).items() if name != "return"}
        if not inputs or set(inputs) - {"path", "query"}:
            continue
        if "query" in inputs and not _single_values(inputs["query"]):
            continue
        app.view_functions[endpoint] = _validating_view(function, inputs.get("path"), inputs.get("query"))


def _single_values(model: type[BaseModel]) -> bool:
    """No field of the query model takes a list (flask-openapi3 reads those with getlist)."""
    properties = model.model_json_schema().get("properties", {}).values()
    return not any(
        field.get("type") == "array" or any(part.get("type") == "array" for part in field.get("anyOf", []))
        for field in properties
    )


def _validating_view(
    function: Callable[..., Response], path: type[BaseModel] | None, query: type[BaseModel] | None
) -> Callable[..., Response]:
    @wraps(function)
    def view(**path_values: Any) -> Response:
        inputs: dict[str, BaseModel] = {}
        try:
            if path is not None:
                inputs["path"] = path.model_validate(path_values)
            if query is not None:
                # As flask-openapi3 reads a query of single values: each key's first value.
                inputs["query"] = query.model_validate(request.args.to_dict())
        except ValidationError as error:
            return validation_error_response(error)
        return function(**inputs)

    return view


def init_app(app: OpenAPI) -> None:
    """Register the API routes, /openapi.json and /docs."""
    app.register_api(api)
    validate_simple_inputs(app)
    app.add_url_rule("/openapi.json", "openapi", _openapi_json)
    docs.init_app(app)
