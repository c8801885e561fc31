"""The same read endpoint "built the obvious way", to compare catalog against.

Flask + Flask-Caching (RedisCache, `@cache.cached`) + Flask-Limiter (Redis storage) + a python-json-logger
access log + prometheus-flask-exporter (GunicornInternalPrometheusMetrics, multiprocess) + SQLAlchemy
reading one product from SQLite, with the API key checked by a plain dict lookup. Every library is used
the way its README shows.

It reads the same environment as catalog: CATALOG_DATABASE_URL, CATALOG_REDIS_URL, CATALOG_API_KEYS_DIR,
CATALOG_RATE_LIMIT, CATALOG_CACHE_TTL_SECONDS, PROMETHEUS_MULTIPROC_DIR.

    python obvious_app.py --init-db <product-id>...  # create the table and the products (before gunicorn)
    gunicorn obvious_app:app                        # serve
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, g, jsonify, request
from flask_caching import Cache
from flask_limiter import Limiter
from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics
from pythonjsonlogger.json import JsonFormatter
from sqlalchemy import JSON, DateTime, Integer, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

DATABASE_URL = os.environ.get("CATALOG_DATABASE_URL", "sqlite:///obvious.db")
REDIS_URL = os.environ.get("CATALOG_REDIS_URL", "redis://127.0.0.1:6379/0")
KEYS_DIR = Path(os.environ.get("CATALOG_API_KEYS_DIR", "api-keys"))
RATE_LIMIT = os.environ.get("CATALOG_RATE_LIMIT", "1000/second")
CACHE_TTL = int(os.environ.get("CATALOG_CACHE_TTL_SECONDS", "60"))


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    sku: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(2000), default="")
    price_cents: Mapped[int] = mapped_column(Integer)
    currency: Mapped[str] = mapped_column(String(3))
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(Integer, default=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sku": self.sku,
            "name": self.name,
            "description": self.description,
            "price_cents": self.price_cents,
            "currency": self.currency,
            "tags": self.tags,
            "created_at": self.created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "updated_at": self.updated_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "version": self.version,
        }


engine = create_engine(DATABASE_URL)


def load_keys() -> dict[str, str]:
    """key -> client name, from one file per client (the same directory layout catalog reads)."""
    keys = {}
    if KEYS_DIR.is_dir():
        for path in KEYS_DIR.iterdir():
            if not path.name.startswith(".") and path.is_file():
                keys[path.read_text().strip()] = path.name
    return keys


API_KEYS = load_keys()

access_log = logging.getLogger("access")
access_handler = logging.StreamHandler(sys.stdout)
access_handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
access_log.addHandler(access_handler)
access_log.setLevel(logging.INFO)
access_log.propagate = False

app = Flask(__name__)
cache = Cache(
    app,
    config={"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": REDIS_URL, "CACHE_DEFAULT_TIMEOUT": CACHE_TTL},
)


def client_name() -> str:
    """The rate-limit key: the API client's name (the limiter runs before authenticate())."""
    return API_KEYS.get(request.headers.get("X-Api-Key", ""), request.remote_addr or "anonymous")


limiter = Limiter(
    client_name,
    app=app,
    default_limits=[RATE_LIMIT],
    storage_uri=REDIS_URL,
    headers_enabled=True,
)
metrics = GunicornInternalPrometheusMetrics(app, group_by="url_rule", excluded_paths=["^/livez$"])


@app.before_request
def authenticate() -> None:
    g.started = time.perf_counter()
    if request.path.startswith("/api/"):
        client = API_KEYS.get(request.headers.get("X-Api-Key", ""))
        if client is None:
            abort(401)
        g.client = client


@app.after_request
def log_access(response: Response) -> Response:
    access_log.info(
        "request",
        extra={
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - g.get("started", time.perf_counter())) * 1000, 3),
            "client": g.get("client"),
        },
    )
    return response


@app.get("/livez")
@limiter.exempt
def livez() -> Response:
    return jsonify(status="ok")


@app.get("/api/v1/products/<product_id>")
@cache.cached()
def get_product(product_id: str) -> Response:
    with Session(engine) as session:
        product = session.get(Product, product_id)
        if product is None:
            abort(404)
        return jsonify(product.to_dict())


@app.get("/api/v1/products")
@cache.cached(query_string=True)
def list_products() -> Response:
    limit = min(max(int(request.args.get("limit", "20")), 1), 100)
    with Session(engine) as session:
        products = session.scalars(select(Product).order_by(Product.id).limit(limit)).all()
        return jsonify({"items": [product.to_dict() for product in products], "next_cursor": None})


def init_db(product_ids: list[str]) -> None:
    """Create the table and the products the bench reads."""
    Base.metadata.create_all(engine)
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        for index, product_id in enumerate(product_ids):
            if session.get(Product, product_id) is not None:
                continue
            session.add(
                Product(
                    id=product_id,
                    sku=f"BENCH-{index + 1}",
                    name="Bench product",
                    description="A product to measure with",
                    price_cents=1250,
                    currency="EUR",
                    tags=["bench"],
                    created_at=now,
                    updated_at=now,
                    version=1,
                )
            )


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--init-db":
        init_db(sys.argv[2:])
    else:
        sys.exit(__doc__)
