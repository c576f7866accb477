"""loraloop's SQL store: models, engine/session factory, migrations, repositories and job queue.

Knows nothing about HTTP, training or vLLM; the service layer wires it to those.
"""

from memory_store.db import DatabaseUnavailable, make_engine, make_session_factory, upgrade_database
from memory_store.errors import Conflict, IdempotencyConflict, NotFound, StoreError
from memory_store.queue import JobQueue

__all__ = [
    "Conflict",
    "DatabaseUnavailable",
    "IdempotencyConflict",
    "JobQueue",
    "NotFound",
    "StoreError",
    "make_engine",
    "make_session_factory",
    "upgrade_database",
]
