"""The floor of a Flask service: endpoints that answer a small JSON product, or a page of 20, nothing else.

`gunicorn bare_app:app` with the same settings as catalog (see bench/run.py).
"""

from flask import Flask, Response, jsonify, request

PRODUCT = {
    "id": "bench",
    "sku": "BENCH-1",
    "name": "Bench product",
    "description": "A product to measure with",
    "price_cents": 1250,
    "currency": "EUR",
    "tags": ["bench"],
    "created_at": "2026-01-01T00:00:00.000Z",
    "updated_at": "2026-01-01T00:00:00.000Z",
    "version": 1,
}

app = Flask(__name__)


@app.get("/livez")
def livez() -> Response:
    return jsonify(status="ok")


@app.get("/api/v1/products")
def list_products() -> Response:
    limit = int(request.args.get("limit", "20"))
    items = [{**PRODUCT, "id": f"bench-{index:02d}", "sku": f"BENCH-{index}"} for index in range(limit)]
    return jsonify({"items": items, "next_cursor": None})


@app.get("/api/v1/products/<product_id>")
def get_product(product_id: str) -> Response:
    return jsonify({**PRODUCT, "id": product_id})
