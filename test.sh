#!/usr/bin/env bash
# Install everything the tests need (packages, Chromium, test models) and run the whole suite, lint included.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
ruff format --check .
hadolint Dockerfile
python -m pytest "$@"
