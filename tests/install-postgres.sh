#!/bin/sh
# Install and start a local PostgreSQL server for the PostgreSQL catalog tests, where apt-get can, and create
# their login role clipsearch_test (password clipsearch_test, CREATEDB) for password logins on 127.0.0.1.
# Idempotent and quiet: returns at once when that role can already log in on 127.0.0.1:5432. Where it cannot
# (macOS, no root or password-less sudo, no network) it says so in one line and exits 0: the PostgreSQL catalog
# tests are then skipped (except under CI=true, where they fail).
# The tests connect to 127.0.0.1:5432 unless CLIPSEARCH_TEST_POSTGRES names another server (a SQLAlchemy URL of a
# maintenance database, e.g. postgresql+psycopg://user:password@host:5433/postgres, whose user may CREATE DATABASE):
# when the local cluster listens on another port, this script prints the value to set.
set -u

role=clipsearch_test
default_port=5432

# The one check that matters: can the tests' role log in over TCP, as the fixtures will?
can_log_in() {
    command -v psql >/dev/null 2>&1 &&
        PGPASSWORD=$role PGCONNECT_TIMEOUT=3 psql -X -q -t -A -w -h 127.0.0.1 -p "$1" -U "$role" -d postgres \
            -c 'SELECT 1' >/dev/null 2>&1
}

if can_log_in "$default_port"; then
    exit 0
fi

skip() {
    echo "install-postgres.sh: could not set up PostgreSQL ($1): PostgreSQL catalog tests will be skipped" >&2
    exit 0
}

have_server() {
    command -v pg_lsclusters >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1
}

if have_server; then
    :
elif ! command -v apt-get >/dev/null 2>&1; then
    skip "no apt-get here; start a PostgreSQL server yourself and set CLIPSEARCH_TEST_POSTGRES"
fi

if [ "$(id -u)" -eq 0 ]; then
    as_root=""
    as_postgres="runuser -u postgres --"
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"  # never waits for a password
    as_postgres="sudo -n -u postgres --"
else
    skip "needs root: sudo apt-get install postgresql, or set CLIPSEARCH_TEST_POSTGRES"
fi

log=$(mktemp "${TMPDIR:-/tmp}/install-postgres.XXXXXX")
trap 'rm -f "$log"' EXIT
cd /  # the postgres user may not be allowed into the caller's directory

if ! have_server; then
    install() {
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            postgresql >>"$log" 2>&1
    }
    # The package lists may already be fresh enough: update them only when the install fails without.
    if ! install; then
        $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$log" 2>&1
        if ! install; then
            tail -n 5 "$log" >&2
            skip "apt-get install postgresql failed"
        fi
    fi
    hash -r 2>/dev/null || true  # forget command locations the shell remembered before the install
    have_server || skip "installed, but no PostgreSQL server or pg_lsclusters was found"
fi

# The package normally creates a cluster; create one for the newest installed server when there is none.
if [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
    version=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
    $as_root pg_createcluster "$version" main >>"$log" 2>&1 || {
        tail -n 5 "$log" >&2
        skip "pg_createcluster $version main failed"
    }
fi

# Use a running cluster if there is one, else the first (columns: version name port status owner ...).
cluster=$(pg_lsclusters -h | awk '$4 ~ /^online/ { print; exit }')
[ -n "$cluster" ] || cluster=$(pg_lsclusters -h | head -n 1)
set -- $cluster
version=$1 name=$2 port=$3 status=$4

# No systemd in containers: pg_ctlcluster starts the server itself, as the cluster's owner.
case $status in
online*) ;;
*)
    $as_root pg_ctlcluster "$version" "$name" start >>"$log" 2>&1 || {
        tail -n 5 "$log" >&2
        skip "pg_ctlcluster $version $name start failed"
    }
    ;;
esac

waited=0
until pg_isready -q -h 127.0.0.1 -p "$port" -t 1 >/dev/null 2>&1; do
    waited=$((waited + 1))
    [ "$waited" -lt 30 ] || skip "cluster $version/$name did not accept connections on 127.0.0.1:$port within 30 s"
    sleep 1
done

# Create the role, or repair it (login, CREATEDB, password) when it exists but could not log in.
create_role="SELECT CASE WHEN EXISTS (SELECT FROM pg_roles WHERE rolname = '$role') THEN 'ALTER' ELSE 'CREATE' END
    || ' ROLE $role LOGIN CREATEDB PASSWORD ''$role''' \gexec"
printf '%s\n' "$create_role" | $as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$port" -d postgres >>"$log" 2>&1 || {
    tail -n 5 "$log" >&2
    skip "could not create the role $role in cluster $version/$name"
}

can_log_in "$port" ||
    skip "$role cannot log in on 127.0.0.1:$port: check pg_hba.conf allows password (scram-sha-256) logins there"

if [ "$port" != "$default_port" ]; then
    echo "install-postgres.sh: cluster $version/$name listens on port $port: for the PostgreSQL catalog tests set" \
        "CLIPSEARCH_TEST_POSTGRES=postgresql+psycopg://$role:$role@127.0.0.1:$port/postgres" >&2
fi
