#!/usr/bin/env bash
# Debian's PostgreSQL server, for the Prefect-on-PostgreSQL tests (tests/test_postgres.py); `make test`
# runs this before any test. It installs the package with apt-get as root (or with passwordless sudo);
# where it cannot, it says so in one line and those tests are skipped, except under CI=true, where a
# PostgreSQL that cannot be installed is an error.
set -uo pipefail
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ]; then
    as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    as_root=(none)
fi
if [ "${as_root[0]:-}" != none ] && command -v apt-get >/dev/null; then
    echo "make test: installing Debian's postgresql for the Prefect-on-PostgreSQL tests (tests/test_postgres.py)"
    # The package's own cluster is not needed (the tests start theirs): do not start services.
    if "${as_root[@]}" apt-get update -qq >/dev/null \
        && "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; then
        exit 0
    fi
    why="apt-get could not install postgresql"
elif command -v apt-get >/dev/null; then
    why="no PostgreSQL server, and no root or passwordless sudo to apt-get it"
else
    why="no PostgreSQL server, and no apt-get to install it"
fi
if [ "${CI:-}" = true ]; then
    echo "error: $why: CI runs the PostgreSQL tests (tests/test_postgres.py)" >&2
    exit 1
fi
echo "make test: $why: tests/test_postgres.py will be skipped (install PostgreSQL to run it)"
