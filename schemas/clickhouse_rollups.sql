-- Hourly rollups for reports (see streams/rollups.py and streams/reports/README.md).
-- Sealed hours only: an hour is aggregated once every correction for it is in (older than the
-- correction retention), by INSERT ... SELECT ... FROM <base> FINAL. Re-sealing an hour writes
-- the very same keys and values, and readers use FINAL, so a repeated seal never double counts.
-- {db} is replaced by the database name. These tables are derived: when a table here exists
-- with other columns than below (an upgrade changed its shape), the store drops every table of
-- this file at start (ClickHouseStore.create_schema) and the worker's next seal rebuilds them
-- from the base rows.

CREATE TABLE IF NOT EXISTS {db}.gpu_cost_hourly
(
    hour              DateTime('UTC'),
    cluster           LowCardinality(String),
    node              LowCardinality(String),
    device_uuid       String,
    gpu_model         LowCardinality(String),
    mig_profile       LowCardinality(String),
    pricing           LowCardinality(String),
    price_per_hour    Decimal(38, 15),
    namespace         LowCardinality(String),
    pod               String,
    pod_uid           String,
    team              LowCardinality(String),
    product           LowCardinality(String),
    cost_center       LowCardinality(String),
    kind              LowCardinality(String),
    device_seconds    Float64,
    sm_pct_window_s   Float64,
    window_s          Float64,
    cost_usd          Decimal(38, 15),
    idle_cost_usd     Decimal(38, 15),
    windows           UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, device_uuid, pod_uid, kind, team, product, cost_center, namespace, pod, pricing,
          price_per_hour, cluster, node, gpu_model, mig_profile);

CREATE TABLE IF NOT EXISTS {db}.token_cost_hourly
(
    hour              DateTime('UTC'),
    cluster           LowCardinality(String),
    namespace         LowCardinality(String),
    pod               String,
    pod_uid           String,
    team              LowCardinality(String),
    product           LowCardinality(String),
    cost_center       LowCardinality(String),
    model             LowCardinality(String),
    cost_usd          Decimal(38, 15),
    prompt_tokens     UInt64,
    completion_tokens UInt64,
    requests          UInt64,
    cached_tokens     UInt64,
    prefill_s         Float64,
    decode_s          Float64,
    windows           UInt64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, pod_uid, model, team, product, cost_center, namespace, pod, cluster);

-- Every hour before `sealed_until_ms` is in both rollup tables. Highest version wins.
CREATE TABLE IF NOT EXISTS {db}.rollup_horizon
(
    name            LowCardinality(String),
    sealed_until_ms Int64,
    version         UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY name;
