"""Repositories: the small, keyword-only read/write API over the loraloop tables.

Convention: a repository wraps a Session it is given and never commits. It flushes so ids exist,
and the caller owns the transaction: `with session_factory.begin() as session:
FeedbackRepository(session).add(...)` commits once at the end, or rolls everything back on error
(so a batch is all-or-nothing). Every list is ordered by id ascending and paginated with an
`after_id` cursor (pass the last id of the previous page). Nothing here knows about HTTP.
"""

from __future__ import annotations

from memory_store.repositories._common import DEFAULT_PAGE_SIZE
from memory_store.repositories.adapters import (
    DELETABLE_STATUSES,
    SERVABLE_STATUSES,
    AdapterRepository,
    files_deleted_message,
)
from memory_store.repositories.conversations import ConversationRepository
from memory_store.repositories.deployments import DeploymentRepository
from memory_store.repositories.feedback import (
    REPLAY_EXACT_SPAN,
    REPLAY_SEEKS_PER_STATEMENT,
    FeedbackRepository,
    NewFeedback,
)
from memory_store.repositories.memories import MemoryRepository
from memory_store.repositories.runs import TrainingRunRepository

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DELETABLE_STATUSES",
    "REPLAY_EXACT_SPAN",
    "REPLAY_SEEKS_PER_STATEMENT",
    "SERVABLE_STATUSES",
    "AdapterRepository",
    "ConversationRepository",
    "DeploymentRepository",
    "FeedbackRepository",
    "MemoryRepository",
    "NewFeedback",
    "TrainingRunRepository",
    "files_deleted_message",
]
