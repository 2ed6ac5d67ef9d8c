"""The one package that talks to Postgres: every read and write durable makes.

``schema`` finds the SQL and applies migrations; ``database`` holds the pool, the kept
connections and the clock; the Store (``store``) is composed of parts on it: ``tasks``
enqueues, claims and finishes, ``workflows`` keeps the event log, ``operations`` runs
limits, schedules and upkeep; ``listen`` holds the LISTEN connection. Nothing outside
this package imports asyncpg.
"""

from durable.store.database import KeptConnection, statement_deadline
from durable.store.listen import Subscription
from durable.store.schema import (
    LOCK_TIMEOUT,
    LOCK_WAIT,
    MIGRATION_LOCK,
    PINNED_SESSION,
    PRUNE_LOCK,
    TRANSIENT_ERRORS,
    Connection,
    DatabaseError,
    NamedSql,
    check_schema,
    connect,
    create_database,
    drop_database,
    grant,
    is_fatal,
    is_transient,
    latest_version,
    migrate,
    migration_files,
    missing_tables,
    named_queries,
    queries,
    quote_ident,
    schema_problem,
    schema_sql,
    schema_version,
    sql_dir,
)
from durable.store.store import Store

__all__ = [
    "LOCK_TIMEOUT",
    "LOCK_WAIT",
    "MIGRATION_LOCK",
    "PINNED_SESSION",
    "PRUNE_LOCK",
    "TRANSIENT_ERRORS",
    "Connection",
    "DatabaseError",
    "KeptConnection",
    "NamedSql",
    "Store",
    "Subscription",
    "check_schema",
    "connect",
    "create_database",
    "drop_database",
    "grant",
    "is_fatal",
    "is_transient",
    "latest_version",
    "migrate",
    "migration_files",
    "missing_tables",
    "named_queries",
    "queries",
    "quote_ident",
    "schema_problem",
    "schema_sql",
    "schema_version",
    "sql_dir",
    "statement_deadline",
]
