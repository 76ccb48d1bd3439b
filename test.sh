#!/usr/bin/env bash
# Install everything the tests need (packages, Chromium, test models) and run the whole suite, lint
# included: once on SQLite, then the tests that touch the database (-m database) again on a throwaway
# PostgreSQL (scripts/with-postgres.sh; TEST_DATABASE_URL=postgres://... uses a server of yours). Without
# PostgreSQL on the machine the second pass is skipped with a warning, except in CI (CI=true), where it fails.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
hadolint Dockerfile
python -m pytest "$@"
status=0
./scripts/with-postgres.sh python -m pytest -m database "$@" || status=$?
if [[ $status == 69 && "${CI:-}" != "true" ]]; then
    echo "test.sh: WARNING: no PostgreSQL here, so the database tests ran on SQLite only" >&2
elif [[ $status != 0 && $status != 5 ]]; then  # 5: the tests asked for touch no database
    exit "$status"
fi
