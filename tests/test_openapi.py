"""The OpenAPI 3.1 document covers every /api/v1 operation, with problem+json errors and the key scheme."""

import re
from typing import Any

import pytest
from pydantic import BaseModel
from tests.conftest import auth

from catalog.api.schemas import ProductListQuery


@pytest.fixture
def spec(client: Any) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    return dict(response.get_json())


def test_every_operation_is_described(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1")
    operations = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert operations == {
        ("/api/v1/products", "get"),
        ("/api/v1/products", "post"),
        ("/api/v1/products/{product_id}", "get"),
        ("/api/v1/products/{product_id}", "put"),
        ("/api/v1/products/{product_id}", "patch"),
        ("/api/v1/products/{product_id}", "delete"),
    }


def test_errors_are_problem_json_and_success_bodies_have_schemas(spec: dict[str, Any]) -> None:
    for item in spec["paths"].values():
        for operation in item.values():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == ["application/problem+json"]
                    assert response["content"]["application/problem+json"]["schema"]["$ref"].endswith(
                        "ProblemDetail"
                    )
            assert {"401", "403", "422", "429"} <= operation["responses"].keys()
    assert spec["paths"]["/api/v1/products/{product_id}"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]


def test_the_api_key_schemes_guard_every_operation(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "X-Api-Key"}
    assert schemes["Bearer"]["scheme"] == "bearer"
    for item in spec["paths"].values():
        for operation in item.values():
            assert operation["security"] == [{"ApiKey": []}, {"Bearer": []}]


def test_request_rules_are_in_the_schema(spec: dict[str, Any]) -> None:
    product_in = spec["components"]["schemas"]["ProductIn"]
    assert product_in["additionalProperties"] is False
    assert product_in["properties"]["price_cents"]["type"] == "integer"
    assert product_in["properties"]["price_cents"]["maximum"] == 10**12
    assert set(product_in["required"]) == {"sku", "name", "price_cents", "currency"}
    patch = spec["paths"]["/api/v1/products/{product_id}"]["patch"]
    assert "application/merge-patch+json" in patch["requestBody"]["content"]
    headers = {p["name"] for p in spec["paths"]["/api/v1/products"]["post"]["parameters"]}
    assert "Idempotency-Key" in headers


def test_docs_is_swagger_ui_from_local_files_under_a_strict_policy(client: Any) -> None:
    response = client.get("/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in response.headers["Content-Security-Policy"].split(";")
    )
    assert policy["default-src"] == "'none'" and policy["script-src"] == "'self'"
    assert policy["style-src"] == "'self'" and policy["connect-src"] == "'self'"
    page = response.get_data(as_text=True)
    assert "<script>" not in page and "<style" not in page and "http" not in page
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(source.startswith("docs/") for source in sources)
    for source in sources:
        asset = client.get(f"/{source}")
        assert asset.status_code == 200 and asset.content_length > 0, source
        asset.close()
    assert "openapi.json" in client.get("/docs/init.js").get_data(as_text=True)


def test_the_query_models_schema_is_made_once_and_is_pydantics(client: Any) -> None:
    """flask-openapi3 asks for the query model's schema on every list request: it is made once per class
    (the same object each time), and it is exactly what pydantic makes."""
    first = ProductListQuery.model_json_schema()
    for _ in range(3):
        assert client.get("/api/v1/products?limit=5", headers=auth()).status_code == 200
    assert ProductListQuery.model_json_schema() is first
    assert first == BaseModel.model_json_schema.__func__(ProductListQuery)  # type: ignore[attr-defined]
    assert ProductListQuery.model_json_schema(mode="serialization") is not first


def test_the_server_s_own_limits_are_documented_on_every_operation(spec: dict[str, Any]) -> None:
    """gunicorn answers 414 (request line) and 431 (header fields) before the app: problem bodies too."""
    for item in spec["paths"].values():
        for operation in item.values():
            for status in ("414", "431"):
                response = operation["responses"][status]
                assert list(response["content"]) == ["application/problem+json"]
                assert "RateLimit-Limit" not in response["headers"]  # the app never saw the request
            assert "Retry-After" in operation["responses"]["503"]["headers"]


def test_every_rule_the_validation_enforces_is_in_the_document(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    text = {"pattern": "^[^\\u0000]*$"}
    product_in = schemas["ProductIn"]["properties"]
    assert text.items() <= product_in["name"].items() and text.items() <= product_in["description"].items()
    assert text.items() <= product_in["tags"]["items"].items()
    assert product_in["price_cents"]["minimum"] == 0 and product_in["price_cents"]["maximum"] == 10**12
    patch = schemas["ProductPatch"]
    assert patch["additionalProperties"] is False and "required" not in patch
    # Required fields may be left out of a patch, never nulled; the optional ones may be reset with null.
    nullable = {
        name for name, field in patch["properties"].items() if {"type": "null"} in field.get("anyOf", [])
    }
    assert nullable == {"description", "tags"}
    assert patch["properties"]["price_cents"]["minimum"] == 0
    listing = {p["name"]: p["schema"] for p in spec["paths"]["/api/v1/products"]["get"]["parameters"]}
    assert {"type": "string", "pattern": "^[A-Za-z0-9_-]{35}$"} in listing["cursor"]["anyOf"]
    assert any(
        {"maxLength": 40, "minLength": 1, **text}.items() <= option.items()
        for option in listing["tag"]["anyOf"]
    )
    post = {p["name"]: p["schema"] for p in spec["paths"]["/api/v1/products"]["post"]["parameters"]}
    assert post["Idempotency-Key"]["pattern"] == "^[!-~]{1,255}$"
