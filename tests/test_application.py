"""The application class: what its answers send, whether werkzeug had headers to fix or not."""

from typing import Any

import pytest
from tests.conftest import auth, product_body

from catalog.application import CatalogResponse


def sent(response: CatalogResponse) -> tuple[str, list[tuple[str, str]], bytes]:
    """Status line, header list and body exactly as the server is handed them."""
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], _exc: Any = None) -> None:
        seen.update(status=status, headers=headers)

    environ = {
        "REQUEST_METHOD": "GET",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }
    body = b"".join(response(environ, start_response))
    return seen["status"], seen["headers"], body


def test_a_plain_answer_sends_its_own_headers_once_each() -> None:
    response = CatalogResponse(
        b'{"a":1}', mimetype="application/json", headers={"ETag": '"3"', "X-Cache": "HIT"}
    )
    status, headers, body = sent(response)
    assert status == "200 OK" and body == b'{"a":1}'
    assert headers == [
        ("ETag", '"3"'),
        ("X-Cache", "HIT"),
        ("Content-Type", "application/json"),
        ("Content-Length", "7"),
    ]


def test_headers_that_need_no_fix_are_not_copied() -> None:
    response = CatalogResponse(b"{}", mimetype="application/json")
    assert response.get_wsgi_headers({}) is response.headers


def test_headers_added_after_the_answer_is_built_are_sent() -> None:
    response = CatalogResponse(b"{}", mimetype="application/json")
    response.headers.add("X-Request-ID", "r1")
    assert ("X-Request-ID", "r1") in sent(response)[1]


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("Location", "/ä", "/%C3%A4"), ("Content-Location", "/ü?x=ß", "/%C3%BC?x=%C3%9F")],
)
def test_locations_are_still_encoded(name: str, value: str, expected: str) -> None:
    response = CatalogResponse(b"{}", status=201, mimetype="application/json", headers={name: value})
    assert (name, expected) in sent(response)[1]


def test_a_body_without_a_length_gets_one() -> None:
    response = CatalogResponse([b"ab", b"cd"], mimetype="application/json")
    headers = dict(sent(response)[1])
    assert headers["Content-Length"] == "4"


def test_304_drops_entity_headers_and_204_the_length() -> None:
    not_modified = CatalogResponse(b"{}", status=304, mimetype="application/json", headers={"ETag": '"1"'})
    status, headers, body = sent(not_modified)
    assert status == "304 NOT MODIFIED" and body == b""
    assert headers == [("ETag", '"1"')]
    no_content = CatalogResponse(status=204)
    assert "Content-Length" not in dict(sent(no_content)[1])


def test_the_api_answers_through_it(client: Any) -> None:
    created = client.post("/api/v1/products", json=product_body(), headers=auth())
    assert created.headers["Location"] == f"/api/v1/products/{created.get_json()['id']}"
    read = client.get(created.headers["Location"], headers=auth())
    assert int(read.headers["Content-Length"]) == len(read.get_data())
    head = client.head(created.headers["Location"], headers=auth())
    assert head.headers["Content-Length"] == read.headers["Content-Length"] and head.get_data() == b""
    assert [name for name, _ in read.headers].count("Content-Length") == 1
