"""The products API, every rule of the contract, on SQLite and on PostgreSQL."""

import json
import re
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from tests.conftest import READER_KEY, assert_problem, auth, product_body

from catalog.config import Settings
from catalog.products import CURSOR_PATTERN

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """Run every test of this module on both databases."""
    return str(request.param)


def create(client: Any, **overrides: Any) -> dict[str, Any]:
    response = client.post("/api/v1/products", json=product_body(**overrides), headers=auth())
    assert response.status_code == 201, response.get_json()
    return dict(response.get_json())


def count(client: Any) -> int:
    return len(client.get("/api/v1/products?limit=100", headers=auth()).get_json()["items"])


def error_locs(response: Any) -> list[list[Any]]:
    return [error["loc"] for error in assert_problem(response, 422)["errors"]]


class TestCreate:
    def test_answers_201_with_the_product_location_and_etag(self, client: Any) -> None:
        body = product_body(tags=["kitchen", "coffee"])
        response = client.post("/api/v1/products", json=body, headers=auth())
        assert response.status_code == 201
        product = response.get_json()
        assert response.headers["Location"] == f"/api/v1/products/{product['id']}"
        assert response.headers["ETag"] == '"1"'
        assert {k: product[k] for k in body} == body
        assert product["version"] == 1
        assert RFC3339_UTC.match(product["created_at"]) and product["created_at"] == product["updated_at"]

    def test_description_and_tags_are_optional(self, client: Any) -> None:
        body = product_body()
        del body["description"], body["tags"]
        product = client.post("/api/v1/products", json=body, headers=auth()).get_json()
        assert product["description"] == "" and product["tags"] == []

    def test_duplicate_sku_is_409_and_changes_nothing(self, client: Any) -> None:
        first = create(client)
        response = client.post("/api/v1/products", json=product_body(sku=first["sku"]), headers=auth())
        assert_problem(response, 409)
        assert count(client) == 1

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("price_cents", True),
            ("price_cents", "1250"),
            ("price_cents", 12.5),
            ("price_cents", -1),
            ("price_cents", 10**12 + 1),
            ("sku", "abc-123"),
            ("sku", ""),
            ("sku", "A" * 65),
            ("name", ""),
            ("name", "n" * 201),
            ("name", 5),
            ("name", "nul\x00byte"),
            ("description", "d" * 2001),
            ("currency", "eur"),
            ("currency", "EURO"),
            ("tags", ["t"] * 21),
            ("tags", ["t" * 41]),
            ("tags", [""]),
            ("tags", "kitchen"),
            ("surprise", 1),
        ],
    )
    def test_a_broken_rule_is_422_naming_the_field_and_changes_nothing(
        self, client: Any, field: str, value: Any
    ) -> None:
        response = client.post("/api/v1/products", json=product_body(**{field: value}), headers=auth())
        assert any(loc[:2] == ["body", field] for loc in error_locs(response)), response.get_json()
        assert count(client) == 0

    def test_a_whole_number_written_with_a_fraction_part_is_that_integer(self, client: Any) -> None:
        """1250.0 is the integer 1250 in JSON, as the document's `type: integer` reads it; 12.5 is not."""
        product = client.post("/api/v1/products", json=product_body(price_cents=1250.0), headers=auth())
        assert product.status_code == 201 and product.get_json()["price_cents"] == 1250
        assert '"price_cents":1250,' in product.get_data(as_text=True).replace(" ", "")

    def test_largest_valid_values_are_accepted(self, client: Any) -> None:
        product = create(
            client, price_cents=10**12, name="n" * 200, description="d" * 2000, tags=["t" * 40] * 20
        )
        assert product["price_cents"] == 10**12

    def test_missing_required_fields_are_all_listed(self, client: Any) -> None:
        locs = error_locs(client.post("/api/v1/products", json={}, headers=auth()))
        assert {tuple(loc) for loc in locs} >= {
            ("body", f) for f in ("sku", "name", "price_cents", "currency")
        }


class TestIdempotencyKey:
    def test_a_repeat_returns_the_first_answer_and_creates_nothing_more(self, client: Any) -> None:
        body = product_body()
        headers = {**auth(), "Idempotency-Key": "order-42"}
        first = client.post("/api/v1/products", json=body, headers=headers)
        again = client.post("/api/v1/products", json=dict(reversed(list(body.items()))), headers=headers)
        assert first.status_code == again.status_code == 201
        assert again.get_json() == first.get_json()
        assert again.headers["Location"] == first.headers["Location"]
        assert again.headers["Idempotent-Replayed"] == "true"
        assert count(client) == 1

    def test_the_same_key_with_another_body_is_422(self, client: Any) -> None:
        headers = {**auth(), "Idempotency-Key": "order-43"}
        assert client.post("/api/v1/products", json=product_body(), headers=headers).status_code == 201
        assert_problem(client.post("/api/v1/products", json=product_body(), headers=headers), 422)
        assert count(client) == 1

    def test_a_malformed_key_is_422(self, client: Any) -> None:
        headers = {**auth(), "Idempotency-Key": "k" * 256}
        assert error_locs(client.post("/api/v1/products", json=product_body(), headers=headers)) == [
            ["header", "Idempotency-Key"]
        ]


class TestRead:
    def test_get_has_a_strong_etag_and_x_cache(self, client: Any) -> None:
        product = create(client)
        first = client.get(f"/api/v1/products/{product['id']}", headers=auth())
        second = client.get(f"/api/v1/products/{product['id']}", headers=auth())
        assert first.get_json() == second.get_json() == product
        assert first.headers["ETag"] == '"1"'
        assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")

    @pytest.mark.parametrize("if_none_match", ['"1"', 'W/"1"', '"7", "1"', "*"])
    def test_if_none_match_with_the_current_etag_is_304(self, client: Any, if_none_match: str) -> None:
        product = create(client)
        headers = {**auth(), "If-None-Match": if_none_match}
        response = client.get(f"/api/v1/products/{product['id']}", headers=headers)
        assert response.status_code == 304
        assert response.headers["ETag"] == '"1"' and response.get_data() == b""

    def test_if_none_match_with_an_old_etag_is_200(self, client: Any) -> None:
        product = create(client)
        response = client.get(f"/api/v1/products/{product['id']}", headers={**auth(), "If-None-Match": '"0"'})
        assert response.status_code == 200

    @pytest.mark.parametrize("product_id", ["01JDQ3ZC8X4V5W6Y7Z8A9B0C1D", "nope", "x" * 64])
    def test_unknown_id_is_404(self, client: Any, product_id: str) -> None:
        assert_problem(client.get(f"/api/v1/products/{product_id}", headers=auth()), 404)

    def test_a_read_only_client_can_read(self, client: Any) -> None:
        product = create(client)
        assert client.get(f"/api/v1/products/{product['id']}", headers=auth(READER_KEY)).status_code == 200


class TestList:
    def test_pages_cover_every_product_once_in_a_stable_order(self, client: Any) -> None:
        created = [create(client)["id"] for _ in range(5)]
        seen: list[str] = []
        url = "/api/v1/products?limit=2"
        pages = 0
        while url:
            page = client.get(url, headers=auth()).get_json()
            seen += [item["id"] for item in page["items"]]
            pages += 1
            url = f"/api/v1/products?limit=2&cursor={page['next_cursor']}" if page["next_cursor"] else ""
        assert pages == 3
        assert seen == sorted(created) and sorted(seen) == sorted(created)
        assert client.get("/api/v1/products?limit=100", headers=auth()).get_json()["next_cursor"] is None

    def test_default_limit_is_20(self, client: Any) -> None:
        for _ in range(21):
            create(client)
        page = client.get("/api/v1/products", headers=auth()).get_json()
        assert len(page["items"]) == 20 and page["next_cursor"]

    def test_tag_filters(self, client: Any) -> None:
        tea = create(client, tags=["tea", "kitchen"])
        create(client, tags=["coffee"])
        items = client.get("/api/v1/products?tag=tea", headers=auth()).get_json()["items"]
        assert [item["id"] for item in items] == [tea["id"]]

    def test_tag_filters_follow_writes_that_change_the_tags_and_those_that_do_not(self, client: Any) -> None:
        tea = create(client, tags=["tea", "kitchen"])
        path, merge_patch = f"/api/v1/products/{tea['id']}", {"Content-Type": "application/merge-patch+json"}

        def tagged(tag: str) -> list[str]:
            items = client.get(f"/api/v1/products?tag={tag}", headers=auth()).get_json()["items"]
            return [item["id"] for item in items]

        assert (
            client.patch(path, json={"price_cents": 99}, headers={**auth(), **merge_patch}).status_code == 200
        )
        assert tagged("tea") == tagged("kitchen") == [tea["id"]]
        assert (
            client.patch(
                path, json={"tags": ["kitchen", "tea"]}, headers={**auth(), **merge_patch}
            ).status_code
            == 200
        )
        assert tagged("tea") == tagged("kitchen") == [tea["id"]]
        assert (
            client.patch(path, json={"tags": ["tea", "green"]}, headers={**auth(), **merge_patch}).status_code
            == 200
        )
        assert (tagged("tea"), tagged("green"), tagged("kitchen")) == ([tea["id"]], [tea["id"]], [])
        body = client.get(path, headers=auth()).get_json()
        assert body["tags"] == ["tea", "green"] and body["price_cents"] == 99

    @pytest.mark.parametrize("limit", ["0", "101", "abc", "true", "1.5", ""])
    def test_limit_outside_1_to_100_is_422(self, client: Any, limit: str) -> None:
        assert ["query", "limit"] in error_locs(client.get(f"/api/v1/products?limit={limit}", headers=auth()))

    @pytest.mark.parametrize(
        ("cursor", "problem"),
        [
            ("garbage", "validation-error"),  # not of the documented shape
            ("AAAA", "validation-error"),
            ("%00", "validation-error"),
            ("A" * 35, "invalid-cursor"),  # of the shape, but not made here
        ],
    )
    def test_a_cursor_not_made_here_is_422(self, client: Any, cursor: str, problem: str) -> None:
        response = client.get(f"/api/v1/products?cursor={cursor}", headers=auth())
        assert ["query", "cursor"] in error_locs(response)
        assert response.get_json()["type"] == f"/problems/{problem}"

    def test_every_next_cursor_has_the_documented_shape(self, client: Any) -> None:
        for _ in range(3):
            create(client)
        cursor = client.get("/api/v1/products?limit=1", headers=auth()).get_json()["next_cursor"]
        assert re.fullmatch(CURSOR_PATTERN, cursor)

    @pytest.mark.parametrize("tag", ["%00", "a%00b"])
    def test_a_tag_filter_no_product_can_have_is_422_not_a_database_error(
        self, client: Any, tag: str
    ) -> None:
        assert ["query", "tag"] in error_locs(client.get(f"/api/v1/products?tag={tag}", headers=auth()))

    def test_a_write_is_seen_by_the_next_list(self, client: Any) -> None:
        assert client.get("/api/v1/products", headers=auth()).get_json()["items"] == []
        product = create(client)
        assert [p["id"] for p in client.get("/api/v1/products", headers=auth()).get_json()["items"]] == [
            product["id"]
        ]


class TestReplace:
    def test_put_replaces_and_bumps_the_version(self, client: Any) -> None:
        product = create(client)
        client.get(f"/api/v1/products/{product['id']}", headers=auth())
        body = product_body(name="Tea cup", price_cents=990)
        response = client.put(f"/api/v1/products/{product['id']}", json=body, headers=auth())
        assert response.status_code == 200 and response.headers["ETag"] == '"2"'
        updated = response.get_json()
        assert (
            updated["version"] == 2
            and updated["name"] == "Tea cup"
            and updated["created_at"] == product["created_at"]
        )
        assert client.get(f"/api/v1/products/{product['id']}", headers=auth()).get_json() == updated

    def test_if_match_stale_is_412_and_changes_nothing(self, client: Any) -> None:
        product = create(client)
        headers = {**auth(), "If-Match": '"2"'}
        assert_problem(
            client.put(f"/api/v1/products/{product['id']}", json=product_body(), headers=headers), 412
        )
        assert client.get(f"/api/v1/products/{product['id']}", headers=auth()).get_json() == product

    @pytest.mark.parametrize("if_match", ['"1"', "*", '"3", "1"'])
    def test_if_match_current_passes(self, client: Any, if_match: str) -> None:
        product = create(client)
        headers = {**auth(), "If-Match": if_match}
        assert (
            client.put(f"/api/v1/products/{product['id']}", json=product_body(), headers=headers).status_code
            == 200
        )

    def test_an_empty_if_match_sets_no_condition_like_an_empty_if_none_match(self, client: Any) -> None:
        product = create(client)
        headers = {**auth(), "If-Match": ""}
        response = client.put(f"/api/v1/products/{product['id']}", json=product_body(), headers=headers)
        assert response.status_code == 200 and response.get_json()["version"] == 2

    def test_weak_etags_never_match_if_match(self, client: Any) -> None:
        product = create(client)
        headers = {**auth(), "If-Match": 'W/"1"'}
        assert_problem(
            client.put(f"/api/v1/products/{product['id']}", json=product_body(), headers=headers), 412
        )

    def test_unknown_product_is_404(self, client: Any) -> None:
        response = client.put(
            "/api/v1/products/01JDQ3ZC8X4V5W6Y7Z8A9B0C1D", json=product_body(), headers=auth()
        )
        assert_problem(response, 404)

    def test_taking_another_products_sku_is_409(self, client: Any) -> None:
        first, second = create(client), create(client)
        response = client.put(
            f"/api/v1/products/{second['id']}", json=product_body(sku=first["sku"]), headers=auth()
        )
        assert_problem(response, 409)

    def test_validation_applies_as_for_create(self, client: Any) -> None:
        product = create(client)
        response = client.put(
            f"/api/v1/products/{product['id']}", json=product_body(price_cents=False), headers=auth()
        )
        assert ["body", "price_cents"] in error_locs(response)


class TestPatch:
    def patch(self, client: Any, product_id: str, document: Any, **headers: str) -> Any:
        return client.patch(
            f"/api/v1/products/{product_id}",
            data=__import__("json").dumps(document),
            headers={**auth(), "Content-Type": "application/merge-patch+json", **headers},
        )

    def test_merge_patch_changes_only_what_it_names(self, client: Any) -> None:
        product = create(client)
        response = self.patch(client, product["id"], {"name": "Renamed", "tags": ["new"]})
        assert response.status_code == 200 and response.headers["ETag"] == '"2"'
        patched = response.get_json()
        assert (
            patched["name"] == "Renamed" and patched["tags"] == ["new"] and patched["sku"] == product["sku"]
        )

    def test_null_resets_an_optional_field(self, client: Any) -> None:
        product = create(client)
        patched = self.patch(client, product["id"], {"description": None}).get_json()
        assert patched["description"] == ""

    def test_null_on_a_required_field_is_422(self, client: Any) -> None:
        product = create(client)
        assert ["body", "sku"] in error_locs(self.patch(client, product["id"], {"sku": None}))

    @pytest.mark.parametrize("document", [{"price_cents": True}, {"color": "red"}, [1], "text"])
    def test_invalid_patches_are_422_and_change_nothing(self, client: Any, document: Any) -> None:
        product = create(client)
        assert_problem(self.patch(client, product["id"], document), 422)
        assert client.get(f"/api/v1/products/{product['id']}", headers=auth()).get_json()["version"] == 1

    def test_stale_if_match_is_412(self, client: Any) -> None:
        product = create(client)
        assert_problem(self.patch(client, product["id"], {"name": "x"}, **{"If-Match": '"9"'}), 412)

    def test_plain_json_is_accepted_too(self, client: Any) -> None:
        product = create(client)
        response = client.patch(f"/api/v1/products/{product['id']}", json={"name": "Plain"}, headers=auth())
        assert response.status_code == 200 and response.get_json()["name"] == "Plain"


class TestConcurrentWrites:
    """Writers without If-Match set no condition, so none of them may be refused (the contract's only 412
    is a stale If-Match), and none may undo another: the version counts every write."""

    def test_concurrent_patches_without_if_match_all_apply(
        self, client: Any, settings: Settings, make_client: Callable[[Settings], Any]
    ) -> None:
        product = create(client)
        pods = [client, make_client(settings)]  # two apps: two connection pools, as two pods have
        threads, rounds = 8, 12

        def write(index: int) -> list[int]:
            answers = []
            for round_ in range(rounds):
                response = pods[index % 2].patch(
                    f"/api/v1/products/{product['id']}",
                    json={"description": f"{index}-{round_}", "tags": [f"t{index}"]},
                    headers=auth(),
                )
                answers.append(response.status_code)
            return answers

        with ThreadPoolExecutor(threads) as pool:
            statuses = [status for answers in pool.map(write, range(threads)) for status in answers]
        assert Counter(statuses) == {200: threads * rounds}
        final = client.get(f"/api/v1/products/{product['id']}", headers=auth()).get_json()
        assert final["version"] == 1 + threads * rounds

    def test_concurrent_deletes_and_patches_answer_204_200_or_404(self, client: Any) -> None:
        products = [create(client) for _ in range(6)]

        def write(index: int) -> int:
            path = f"/api/v1/products/{products[index // 4]['id']}"
            if index % 4 == 0:
                return int(client.delete(path, headers=auth()).status_code)
            return int(client.patch(path, json={"name": f"n{index}"}, headers=auth()).status_code)

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(write, range(24)))
        assert set(statuses) <= {200, 204, 404} and statuses.count(204) == 6
        assert count(client) == 0


class TestDelete:
    def test_delete_is_204_then_404(self, client: Any) -> None:
        product = create(client)
        client.get(f"/api/v1/products/{product['id']}", headers=auth())
        response = client.delete(f"/api/v1/products/{product['id']}", headers=auth())
        assert response.status_code == 204 and response.get_data() == b""
        assert_problem(client.get(f"/api/v1/products/{product['id']}", headers=auth()), 404)
        assert_problem(client.delete(f"/api/v1/products/{product['id']}", headers=auth()), 404)

    def test_stale_if_match_is_412_and_keeps_the_product(self, client: Any) -> None:
        product = create(client)
        assert_problem(
            client.delete(f"/api/v1/products/{product['id']}", headers={**auth(), "If-Match": '"5"'}), 412
        )
        assert client.get(f"/api/v1/products/{product['id']}", headers=auth()).status_code == 200


class TestBodies:
    def test_a_body_that_is_not_json_is_415(self, client: Any) -> None:
        response = client.post(
            "/api/v1/products", data="sku=A", headers={**auth(), "Content-Type": "text/plain"}
        )
        assert_problem(response, 415)

    def test_merge_patch_type_is_not_accepted_for_post(self, client: Any) -> None:
        headers = {**auth(), "Content-Type": "application/merge-patch+json"}
        assert_problem(client.post("/api/v1/products", data="{}", headers=headers), 415)

    @pytest.mark.parametrize("data", ['{"sku": ', "", "nul\x00", "[1,"])
    def test_malformed_json_is_400(self, client: Any, data: str) -> None:
        headers = {**auth(), "Content-Type": "application/json"}
        assert_problem(client.post("/api/v1/products", data=data, headers=headers), 400)
        assert count(client) == 0

    def test_json_nested_too_deeply_to_read_is_400_not_a_crash(self, client: Any) -> None:
        headers = {**auth(), "Content-Type": "application/json"}
        response = client.post("/api/v1/products", data="[" * 100_000, headers=headers)
        assert "nests deeper" in assert_problem(response, 400)["detail"]

    @pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
    @pytest.mark.parametrize(
        "document",
        [None, json.dumps(product_body()), json.dumps(json.dumps(product_body())), [product_body()], 1, True],
        ids=["null", "a string holding json", "a string holding that string", "an array", "a number", "true"],
    )
    def test_json_that_is_not_an_object_is_422_and_changes_nothing(
        self, client: Any, method: str, document: Any
    ) -> None:
        product = create(client)
        url = "/api/v1/products" if method == "POST" else f"/api/v1/products/{product['id']}"
        media = "application/merge-patch+json" if method == "PATCH" else "application/json"
        response = client.open(
            url, method=method, data=json.dumps(document), headers={**auth(), "Content-Type": media}
        )
        assert [error["loc"] for error in assert_problem(response, 422)["errors"]] == [["body"]]
        assert count(client) == 1
        assert client.get(f"/api/v1/products/{product['id']}", headers=auth()).get_json() == product

    def test_a_body_over_1_mib_is_413(self, client: Any) -> None:
        body = product_body(description="d" * (1024 * 1024))
        assert_problem(client.post("/api/v1/products", json=body, headers=auth()), 413)
        assert count(client) == 0
