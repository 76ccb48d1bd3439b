#!/usr/bin/env bash
# Start clipsite on 0.0.0.0:${PORT:-8081}. The first run sets up .venv and the packages.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec ./scripts/start.sh
