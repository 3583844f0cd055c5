"""Baseline: images, vectors, roots, metadata, the vector change log and the label tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Catalogs from before migrations (created by SQLAlchemy's create_all, no alembic_version table) hold some or all of
these tables already: each one is created only when missing, so upgrading such a catalog adopts it unchanged.
"""

from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# Paths compare byte-wise on every database: range scans over a folder's paths rely on it ('/' < '0').
PATH = sa.String().with_variant(sa.String(collation="C"), "postgresql")
BIG = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite's INTEGER is already 64-bit
LEGACY_TABLES = ("label_assignments", "label_feedback")  # development builds' label tables, derived data


def _tables() -> list[tuple[str, list, dict]]:
    cascade = {"ondelete": "CASCADE"}
    image_id = lambda: sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", **cascade), primary_key=True)  # noqa: E731
    label_id = lambda: sa.Column("label_id", sa.Integer(), sa.ForeignKey("labels.id", **cascade), primary_key=True)  # noqa: E731
    return [
        ("images", [
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("path", PATH, nullable=False, unique=True),
            sa.Column("root", PATH, nullable=False),
            sa.Column("size", BIG, nullable=False),
            sa.Column("mtime_ns", BIG, nullable=False),
            sa.Column("content_hash", sa.String(), nullable=True),
            sa.Column("width", sa.Integer(), nullable=True),
            sa.Column("height", sa.Integer(), nullable=True),
            sa.Column("format", sa.String(), nullable=True),
            sa.Column("taken_at", sa.DateTime(), nullable=True),
            sa.Column("status", sa.String(), nullable=False),
            sa.Column("error", sa.String(), nullable=True),
            sa.Column("indexed_at", sa.DateTime(), nullable=False),
            sa.Column("updated_at", sa.DateTime(), nullable=False),
        ], {"indexes": [("ix_images_root", ["root"]), ("ix_images_status", ["status"]), ("ix_images_content_hash", ["content_hash"])]}),
        ("roots", [
            sa.Column("path", PATH, primary_key=True),
            sa.Column("added_at", sa.DateTime(), nullable=False),
            sa.Column("last_indexed_at", sa.DateTime(), nullable=True),
        ], {}),
        ("library_meta", [
            sa.Column("key", sa.String(), primary_key=True),
            sa.Column("value", sa.String(), nullable=False),
        ], {}),
        ("vector_changes", [
            # AUTOINCREMENT on SQLite: sequence numbers are never reused after the log is pruned.
            sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
            sa.Column("image_id", sa.Integer(), nullable=False),
        ], {"table": {"sqlite_autoincrement": True}}),
        ("embeddings", [
            image_id(),
            sa.Column("model", sa.String(), nullable=False),
            sa.Column("vector", sa.LargeBinary(), nullable=False),
        ], {"indexes": [("ix_embeddings_model", ["model"])]}),
        ("label_sets", [
            sa.Column("name", sa.String(), primary_key=True),
            sa.Column("templates", sa.String(), nullable=True),
            sa.Column("created_at", sa.DateTime(), nullable=False),
        ], {}),
        ("labels", [
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("set_name", sa.String(), sa.ForeignKey("label_sets.name", **cascade), nullable=False),
            sa.Column("name", sa.String(), nullable=False),
            sa.Column("prompts", sa.String(), nullable=True),
            sa.Column("threshold", sa.Float(), nullable=True),
            sa.UniqueConstraint("set_name", "name"),
        ], {"indexes": [("ix_labels_set_name", ["set_name"])]}),
        ("label_classifiers", [
            label_id(),
            sa.Column("model", sa.String(), primary_key=True),
            sa.Column("key", sa.String(), nullable=False),
            sa.Column("vector", sa.LargeBinary(), nullable=False),
            sa.Column("logit_scale", sa.Float(), nullable=False),
        ], {}),
        ("label_calibration", [
            label_id(),
            sa.Column("model", sa.String(), primary_key=True),
            sa.Column("text_median", sa.Float(), nullable=False),
            sa.Column("text_spread", sa.Float(), nullable=False),
            sa.Column("prototype", sa.LargeBinary(), nullable=True),
            sa.Column("proto_median", sa.Float(), nullable=False),
            sa.Column("proto_spread", sa.Float(), nullable=False),
            sa.Column("proto_weight", sa.Float(), nullable=False),
            sa.Column("cutoff", sa.Float(), nullable=False),
            sa.Column("updated_at", sa.DateTime(), nullable=False),
        ], {}),
        ("label_members", [
            image_id(), label_id(),
            sa.Column("probability", sa.Float(), nullable=False),
            sa.Column("strength", sa.Float(), nullable=False),
            sa.Column("confirmed", sa.Boolean(), nullable=False),
        ], {"indexes": [("ix_label_members_label_strength", ["label_id", "strength"])]}),
        ("label_candidates", [
            image_id(), label_id(),
            sa.Column("probability", sa.Float(), nullable=False),
        ], {"indexes": [("ix_label_candidates_label", ["label_id"])]}),
        ("label_reviews", [
            image_id(), label_id(),
            sa.Column("verdict", sa.String(), nullable=False),
            sa.Column("at", sa.DateTime(), nullable=False),
        ], {"indexes": [("ix_label_reviews_label", ["label_id"])]}),
    ]


# Triggers rather than application code, so that no writer can change a vector without the stores noticing.
SQLITE_TRIGGERS = [
    f"CREATE TRIGGER IF NOT EXISTS embeddings_log_{op_name.lower()} AFTER {op_name} ON embeddings "
    f"BEGIN INSERT INTO vector_changes (image_id) VALUES ({ref}.image_id); END"
    for op_name, ref in (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))
]
POSTGRESQL_TRIGGERS = [
    """CREATE OR REPLACE FUNCTION clipsearch_log_vector_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            INSERT INTO vector_changes (image_id) VALUES (OLD.image_id);
        ELSE
            INSERT INTO vector_changes (image_id) VALUES (NEW.image_id);
        END IF;
        RETURN NULL;
    END $$""",
    "DROP TRIGGER IF EXISTS embeddings_log ON embeddings",
    "CREATE TRIGGER embeddings_log AFTER INSERT OR UPDATE OR DELETE ON embeddings "
    "FOR EACH ROW EXECUTE FUNCTION clipsearch_log_vector_change()",
]


def upgrade() -> None:
    """Create whatever of the baseline schema is missing."""
    bind = op.get_bind()
    existing = set(sa.inspect(bind).get_table_names())
    for name in LEGACY_TABLES:
        if name in existing:
            op.drop_table(name)
    for name, columns, extra in _tables():
        if name in existing:
            continue
        op.create_table(name, *columns, **extra.get("table", {}))
        for index_name, index_columns in extra.get("indexes", []):
            op.create_index(index_name, name, index_columns)
    for statement in SQLITE_TRIGGERS if bind.dialect.name == "sqlite" else POSTGRESQL_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    """Drop the whole catalog (there is nothing before the baseline)."""
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS embeddings_log ON embeddings")
        op.execute("DROP FUNCTION IF EXISTS clipsearch_log_vector_change()")
    for name, _columns, _extra in reversed(_tables()):
        op.drop_table(name)
