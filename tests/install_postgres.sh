#!/usr/bin/env bash
# Debian's PostgreSQL server, for the Prefect-on-PostgreSQL tests (tests/test_postgres.py; they start
# clusters of their own, not the package's): installed as tests/apt_install.sh says, where it is missing.
set -uo pipefail
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && exit 0
source "$(dirname "$0")/apt_install.sh"
apt_install "postgresql" "the PostgreSQL tests (tests/test_postgres.py)" postgresql
