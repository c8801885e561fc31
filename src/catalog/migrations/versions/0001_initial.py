"""Products, their tags, and stored Idempotency-Key answers.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "products",
        sa.Column("id", sa.String(26), primary_key=True),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("price_cents", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("tags", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.UniqueConstraint("sku", name="uq_products_sku"),
    )
    op.create_table(
        "product_tags",
        sa.Column(
            "product_id", sa.String(26), sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("tag", sa.String(40), nullable=False),
        sa.PrimaryKeyConstraint("product_id", "tag"),
    )
    op.create_index("ix_product_tags_tag_product", "product_tags", ["tag", "product_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("client", sa.String(200), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("location", sa.String(300), nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("client", "key"),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_index("ix_product_tags_tag_product", table_name="product_tags")
    op.drop_table("product_tags")
    op.drop_table("products")
