#!/bin/bash
# Runs once, on the ClickHouse container's first start (docker-entrypoint-initdb.d): creates the
# read-only account Grafana queries with. gpuledger's tables are created by the worker.
set -euo pipefail

reader="${GRAFANA_CLICKHOUSE_USER:?GRAFANA_CLICKHOUSE_USER is not set}"
password="${GRAFANA_CLICKHOUSE_PASSWORD:?GRAFANA_CLICKHOUSE_PASSWORD is not set}"

# The password goes into a SQL string literal: allow only characters that need no escaping.
if [[ ! "$reader" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    echo "10-grafana-reader: GRAFANA_CLICKHOUSE_USER must be a plain identifier" >&2
    exit 1
fi
if [[ ! "$password" =~ ^[A-Za-z0-9._@%+=:-]+$ ]]; then
    echo "10-grafana-reader: GRAFANA_CLICKHOUSE_PASSWORD may use only letters, digits and -_.@%+=:" >&2
    exit 1
fi

clickhouse client --host 127.0.0.1 \
    --user "${CLICKHOUSE_USER:-default}" --password "${CLICKHOUSE_PASSWORD:-}" \
    --multiquery <<SQL
CREATE DATABASE IF NOT EXISTS gpuledger;
CREATE USER IF NOT EXISTS ${reader} IDENTIFIED WITH sha256_password BY '${password}'
    SETTINGS readonly = 2;
GRANT SELECT ON gpuledger.* TO ${reader};
SQL
