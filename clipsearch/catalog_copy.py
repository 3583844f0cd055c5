"""Copy a whole catalog into another database (SQLite -> PostgreSQL when a library moves to a server, or back)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from sqlalchemy import func, insert, select

from clipsearch.catalog import Base, Catalog, ImageRow, MetaRow, VectorChangeRow
from clipsearch.catalog_sql import set_sequences
from clipsearch.errors import LibraryError

log = logging.getLogger(__name__)

CHUNK_ROWS = 2000
# Not copied: the change log belongs to the source's numbering. The target's own triggers log every copied vector,
# so its vector index catches up (or rebuilds) from the target's numbers; the floor of the old numbering would hide them.
SKIPPED_TABLES = {VectorChangeRow.__tablename__}
SKIPPED_META = {"vector_log_floor"}
SERIAL_COLUMNS = (("images", "id"), ("labels", "id"))


@dataclass
class CopyReport:
    """Rows copied per table."""

    rows: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Rows copied in all."""
        return sum(self.rows.values())


def copy_catalog(source: Catalog, target: Catalog, progress: Callable[[str, int], None] | None = None) -> CopyReport:
    """Copy every row of `source` into the empty catalog `target`, keeping ids, in one target transaction.

    progress(table, rows so far) is called after each chunk. Raises LibraryError when the target holds images.
    """
    import clipsearch.label_tables  # noqa: F401  (the label tables are part of the catalog)

    with target.read() as session:
        if session.scalar(select(func.count()).select_from(ImageRow)):
            raise LibraryError(
                f"the catalog {target.where} already holds photos",
                "copy into a new, empty database (createdb NAME), or index into that one directly",
            )
    report = CopyReport()
    with source.engine.connect() as reading, target.engine.begin() as writing:
        for table in Base.metadata.sorted_tables:  # parents before children: foreign keys hold at every row
            if table.name in SKIPPED_TABLES:
                continue
            query = select(table)
            if table.name == MetaRow.__tablename__:
                query = query.where(table.c.key.not_in(SKIPPED_META))
                writing.execute(table.delete())  # the target's own counters give way to the source's
            copied = 0
            result = reading.execution_options(yield_per=CHUNK_ROWS).execute(query)
            for chunk in result.mappings().partitions():
                writing.execute(insert(table), [dict(row) for row in chunk])
                copied += len(chunk)
                if progress is not None:
                    progress(table.name, copied)
            report.rows[table.name] = copied
            log.info("copied %d rows of %s", copied, table.name)
        set_sequences(writing, SERIAL_COLUMNS)
    return report
