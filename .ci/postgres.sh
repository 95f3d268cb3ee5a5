#!/usr/bin/env bash
# Start a local PostgreSQL for the store tests and print how to reach it.
#
#   eval "$(bash .ci/postgres.sh | tail -1)"     # sets LOOPCHAT_TEST_PG_URL
#   LOOPCHAT_REQUIRE_PG=1 pytest tests/test_store.py
#
# Idempotent: safe to run again while the server is up. Works as root in a container
# without systemd (Debian/Ubuntu packaging: pg_createcluster / pg_ctlcluster). Listens on
# 127.0.0.1 only. Progress goes to stderr; the last stdout line is the export.
set -euo pipefail

ROLE=loopchat
PASSWORD=loopchat
DB=loopchat_test
CLUSTER=main
PORT=${LOOPCHAT_PG_PORT:-5432}

log() { echo "postgres.sh: $*" >&2; }
as_postgres() { runuser -u postgres -- "$@"; }

if [ "$(id -u)" -ne 0 ]; then
  log "run as root (it installs packages and starts the server as user postgres)"
  exit 1
fi
cd /  # the postgres user may not be allowed into the caller's folder

# 1. Install the server if it is missing.
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  log "installing postgresql"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
VERSION=$(ls /usr/lib/postgresql | sort -V | tail -1)

# 2. Create the cluster if there is none (the package normally creates "main" itself).
CLUSTERS=$(pg_lsclusters -h | awk '{print $1 "/" $2}')  # captured first: grep -q in a pipe can SIGPIPE under pipefail
if ! grep -qx "$VERSION/$CLUSTER" <<<"$CLUSTERS"; then
  log "creating cluster $VERSION/$CLUSTER on port $PORT"
  pg_createcluster "$VERSION" "$CLUSTER" --port "$PORT" >&2
fi
PORT=$(pg_conftool -s "$VERSION" "$CLUSTER" show port)

# 3. Local-only: listen on 127.0.0.1, via a drop-in file in the cluster's conf.d (Debian's
#    postgresql.conf includes it), so the packaged config is never edited. A change needs
#    a restart, so only restart when the file actually changed.
CONF_D=/etc/postgresql/$VERSION/$CLUSTER/conf.d
WANT="listen_addresses = '127.0.0.1'"
if [ "$(cat "$CONF_D/loopchat.conf" 2>/dev/null || true)" != "$WANT" ]; then
  install -d -o postgres -g postgres "$CONF_D"
  echo "$WANT" > "$CONF_D/loopchat.conf"
  chown postgres:postgres "$CONF_D/loopchat.conf"
  if pg_ctlcluster "$VERSION" "$CLUSTER" status >/dev/null 2>&1; then
    log "restarting to apply listen_addresses"
    pg_ctlcluster "$VERSION" "$CLUSTER" restart >&2
  fi
fi

# 4. Start it (pg_ctlcluster works without systemd; the socket dir may be gone after a reboot).
install -d -o postgres -g postgres -m 2775 /var/run/postgresql
if ! pg_ctlcluster "$VERSION" "$CLUSTER" status >/dev/null 2>&1; then
  log "starting cluster $VERSION/$CLUSTER"
  pg_ctlcluster "$VERSION" "$CLUSTER" start >&2
fi
for _ in $(seq 1 30); do
  pg_isready -q -h 127.0.0.1 -p "$PORT" && break
  sleep 1
done
pg_isready -h 127.0.0.1 -p "$PORT" >&2

# 5. Role and database (create if missing; reset the password either way).
psql_admin() { as_postgres psql -p "$PORT" -v ON_ERROR_STOP=1 -qAt "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != "1" ]; then
  log "creating role $ROLE"
  psql_admin -c "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'"
else
  psql_admin -c "ALTER ROLE $ROLE LOGIN PASSWORD '$PASSWORD'"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != "1" ]; then
  log "creating database $DB"
  psql_admin -c "CREATE DATABASE $DB OWNER $ROLE"
fi

# 6. Check a password login over TCP really works, as the tests will do it.
PGPASSWORD=$PASSWORD psql -h 127.0.0.1 -p "$PORT" -U "$ROLE" -d "$DB" -qAt -c "SELECT 1" >/dev/null

echo "export LOOPCHAT_TEST_PG_URL=postgresql+psycopg://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DB"
