#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 with a `drp_test` database that has the
# btree_gist extension the Butler registry needs. Uses a running server when there is one;
# otherwise installs Debian's and starts it (as root). Idempotent.
# Exit 0: ready; 3: this machine cannot run it (no server, and not root or not Debian);
# anything else: failed.
set -euo pipefail
export PGHOST=127.0.0.1 PGUSER=${PGUSER:-postgres}
if ! pg_isready -q 2>/dev/null; then
  if [ "$(id -u)" != 0 ]; then echo "postgres.sh: no server and not root" >&2; exit 3; fi
  if ! command -v pg_ctlcluster >/dev/null; then
    command -v apt-get >/dev/null || { echo "postgres.sh: no server and no apt-get (not Debian)" >&2; exit 3; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  version=$(ls /etc/postgresql | sort -n | tail -1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  # test machine only: local TCP connections without a password
  grep -q "drp-flows test" "$hba" || sed -i "1i host all all 127.0.0.1/32 trust # drp-flows test" "$hba"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster "$version" main start
  for _ in $(seq 30); do pg_isready -q && break; sleep 1; done
fi
psql -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='drp_test'" | grep -q 1 \
  || psql -d postgres -qc "CREATE DATABASE drp_test"
psql -d drp_test -qc "CREATE EXTENSION IF NOT EXISTS btree_gist"
echo "postgres.sh: postgresql://$PGUSER@127.0.0.1:5432/drp_test ready"
