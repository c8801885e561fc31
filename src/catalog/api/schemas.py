"""Request and response shapes of /api/v1: the OpenAPI document and the validation both come from here."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, with_config
from typing_extensions import TypedDict

from catalog.products import CURSOR_PATTERN

# Text every backend can store: no NUL character (the document states it as this pattern, which the
# validator checks too) and no lone surrogate (not Unicode text at all, so no JSON Schema string has one).
TEXT_PATTERN = r"^[^\u0000]*$"
_TEXT = re.compile(TEXT_PATTERN)


def _storable(value: str) -> str:
    """Text every backend can store: no NUL character, no lone surrogate."""
    if not _TEXT.fullmatch(value):
        raise ValueError("must not contain the NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def _whole_number(value: Any) -> Any:
    """A float without a fraction (1250.0) is the integer it equals, as JSON Schema reads numbers; booleans,
    strings and fractions stay what they are and are rejected."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Text = Annotated[str, AfterValidator(_storable), Field(json_schema_extra={"pattern": TEXT_PATTERN})]
Sku = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Z0-9-]+$", examples=["ABC-123"])]
Name = Annotated[Text, Field(min_length=1, max_length=200, examples=["Espresso cup"])]
Description = Annotated[Text, Field(max_length=2000)]
PriceCents = Annotated[
    int, Field(ge=0, le=10**12, strict=True, examples=[1250]), BeforeValidator(_whole_number)
]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", examples=["EUR"])]
Tag = Annotated[Text, Field(min_length=1, max_length=40)]
Tags = Annotated[list[Tag], Field(max_length=20)]


class ProductIn(BaseModel):
    """The fields a client writes with POST and PUT (unknown fields are rejected)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    sku: Sku
    name: Name
    description: Description = ""
    price_cents: PriceCents
    currency: Currency
    tags: Tags = Field(default_factory=list)


@with_config(ConfigDict(extra="forbid", strict=True))
class ProductPatch(TypedDict, total=False):
    """A JSON merge patch (RFC 7396) of a product: present fields replace; null resets an optional field
    (description, tags) to its default, and may not remove a required one."""

    sku: Sku
    name: Name
    description: Description | None
    price_cents: PriceCents
    currency: Currency
    tags: Tags | None


PRODUCT_PATCH = TypeAdapter(ProductPatch)


class Product(BaseModel):
    """A product as the API returns it."""

    id: str = Field(examples=["01JDQ3ZC8X4V5W6Y7Z8A9B0C1D"])
    sku: str
    name: str
    description: str
    price_cents: int
    currency: str
    tags: list[str]
    created_at: str = Field(description="RFC 3339, UTC", examples=["2026-11-27T05:41:07.123Z"])
    updated_at: str = Field(description="RFC 3339, UTC", examples=["2026-11-27T05:41:07.123Z"])
    version: int = Field(ge=1, description="Bumped by every write; the ETag is this number in quotes")


class ProductPage(BaseModel):
    """One page of products; pass `next_cursor` as `cursor` for the next."""

    items: list[Product]
    next_cursor: str | None


_DEFAULT_SCHEMAS: dict[type[BaseModel], dict[str, Any]] = {}


class QueryModel(BaseModel):
    """A model of a query string. flask-openapi3 asks for its JSON schema, with the default arguments, on
    every request it validates (`_validate_query` in its request.py; about 40 % of a list request): the
    schema never changes, so that one is made once per class. (To be reported upstream.)"""

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The model's JSON schema; with the default arguments, the one made first."""
        if args or kwargs:
            return super().model_json_schema(*args, **kwargs)
        schema = _DEFAULT_SCHEMAS.get(cls)
        if schema is None:
            schema = _DEFAULT_SCHEMAS[cls] = super().model_json_schema()
        return schema


class ProductListQuery(QueryModel):
    """Paging and filtering of the product list."""

    limit: int = Field(20, ge=1, le=100, description="Products per page")
    cursor: str | None = Field(
        None, pattern=CURSOR_PATTERN, description="`next_cursor` of the previous page (no other value)"
    )
    tag: Tag | None = Field(None, description="Only products with this tag")


class ProductPath(BaseModel):
    """The product named in the path."""

    product_id: str = Field(min_length=1, max_length=64)


class ValidationErrorItem(BaseModel):
    """One broken rule: where (`loc`) and what (`msg`)."""

    loc: list[str | int]
    msg: str


class ProblemDetail(BaseModel):
    """An RFC 9457 problem body."""

    type: str = Field(examples=["/problems/not-found"])
    title: str
    status: int
    detail: str
    request_id: str | None
    errors: list[ValidationErrorItem] | None = Field(
        None, description="Only on 422: every rule the request broke"
    )


# Where each request model is read from: the `loc` prefix of its validation errors.
LOCATION_OF_MODEL: dict[str, str] = {
    ProductIn.__name__: "body",
    ProductPatch.__name__: "body",
    ProductListQuery.__name__: "query",
    ProductPath.__name__: "path",
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result
