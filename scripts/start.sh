#!/usr/bin/env bash
# The service's start: the container's CMD, and what ./run.sh runs after its set-up.
# Checks the configuration, prepares the database and static files, makes sure the model is on disk
# (fetching a hub id once into CLIP_MODELS_DIR), then serves with gunicorn on 0.0.0.0:$PORT.
# Only the migrations touch the database, as CLIP_MIGRATE says (migrate_at_start): a database that is
# down does not stop the start, so keyless embeddings are served meanwhile instead of a crash loop.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

"$PYTHON" manage.py check --fail-level ERROR
"$PYTHON" manage.py migrate_at_start
"$PYTHON" manage.py collectstatic --noinput -v 0
"$PYTHON" manage.py prepare_model
# Many request threads each get a glibc malloc arena by default, and resident memory creeps up with
# them; two arenas keep it flat (measured by `python manage.py bench`).
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-2}"
exec "$PYTHON" -m gunicorn -c clipsite/gunicorn.conf.py
