#!/bin/sh
# Container entrypoint for the api and worker: migrate the database, then run `loraloop "$@"`.
# `alembic upgrade head` is idempotent; docker-compose.yml starts the worker after the api is healthy.
set -eu
loraloop db upgrade
exec loraloop "$@"
