#!/usr/bin/env bash
# Run a command against a throwaway PostgreSQL on loopback: scripts/with-postgres.sh python -m pytest -m database
#
# The cluster is made from the PostgreSQL found on this machine (Debian's /usr/lib/postgresql/*/bin, or
# initdb on PATH) in a fresh folder, listens on 127.0.0.1 on a free port with trust authentication, and
# is removed when the command ends. The command gets DATABASE_URL pointing at its "clipsite" database
# (the tests create their own databases beside it). As root, the server runs as the postgres user,
# which PostgreSQL requires. With TEST_DATABASE_URL set, that server is used instead and nothing starts.
set -euo pipefail

if [[ -n "${TEST_DATABASE_URL:-}" ]]; then
    DATABASE_URL="$TEST_DATABASE_URL" exec "$@"
fi

bindir=""
for candidate in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V); do  # the newest version last
    [[ -x "$candidate/initdb" ]] && bindir="$candidate"
done
if [[ -z "$bindir" ]] && command -v initdb >/dev/null; then
    bindir="$(dirname "$(command -v initdb)")"
fi
if [[ -z "$bindir" ]]; then
    echo "with-postgres: no PostgreSQL found (apt-get install postgresql, or set TEST_DATABASE_URL)" >&2
    exit 69  # EX_UNAVAILABLE: test.sh tells this apart from the command's own failures
fi

as_owner=()
if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    as_owner=(runuser -u postgres --)
fi

cluster="$(mktemp -d /tmp/clipsite-pg.XXXXXX)"
chmod 755 "$cluster"
[[ ${#as_owner[@]} -gt 0 ]] && chown postgres "$cluster"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

stop() {
    "${as_owner[@]}" "$bindir/pg_ctl" -D "$cluster/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$cluster"
}
trap stop EXIT

"${as_owner[@]}" "$bindir/initdb" -D "$cluster/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$cluster/initdb.log" 2>&1 \
    || { cat "$cluster/initdb.log" >&2; exit 3; }
# Durability off: a throwaway cluster for tests, where fsync only costs time.
"${as_owner[@]}" "$bindir/pg_ctl" -D "$cluster/data" -l "$cluster/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $cluster -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
    start >/dev/null || { cat "$cluster/server.log" >&2; exit 3; }
"${as_owner[@]}" "$bindir/createdb" -h 127.0.0.1 -p "$port" -U postgres clipsite
echo "with-postgres: PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port" >&2

status=0
DATABASE_URL="postgres://postgres@127.0.0.1:$port/clipsite" "$@" || status=$?
exit "$status"
