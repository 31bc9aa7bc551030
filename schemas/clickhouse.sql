-- gpuledger ClickHouse schema (design §4). Idempotent: every statement can run again.
-- {db} is replaced by the database name (default `gpuledger`).
-- Rows are versioned: a replay or correction writes the same key with a higher or equal
-- version, and readers use FINAL, so every key is seen once. Money is Decimal, never Float.
-- non_replicated_deduplication_window lets a retried insert with the same
-- insert_deduplication_token be dropped instead of written twice.

CREATE DATABASE IF NOT EXISTS {db};

CREATE TABLE IF NOT EXISTS {db}.gpu_cost_windows
(
    window_start   DateTime64(3, 'UTC'),
    window_end     DateTime64(3, 'UTC'),
    cluster        LowCardinality(String),
    node           LowCardinality(String),
    device_uuid    String,
    gpu_uuid       String,
    gpu_model      LowCardinality(String),
    mig_profile    LowCardinality(String),
    namespace      LowCardinality(String),
    pod            String,
    pod_uid        String,
    team           LowCardinality(String),
    product        LowCardinality(String),
    cost_center    LowCardinality(String),
    kind           LowCardinality(String),
    device_seconds Float64,
    sm_util_avg    Float64,
    mem_bytes_avg  Float64,
    cost_usd       Decimal(38, 15),
    idle_cost_usd  Decimal(38, 15),
    price_per_hour Decimal(38, 15),
    pricing        LowCardinality(String),
    version        UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (window_start, device_uuid, pod_uid)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.token_windows
(
    window_start      DateTime64(3, 'UTC'),
    window_end        DateTime64(3, 'UTC'),
    cluster           LowCardinality(String),
    namespace         LowCardinality(String),
    pod               String,
    pod_uid           String,
    model             LowCardinality(String),
    prompt_tokens     UInt64,
    completion_tokens UInt64,
    requests          UInt64,
    cached_tokens     UInt64,
    prefill_s         Float64,
    decode_s          Float64,
    version           UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (window_start, pod_uid, model)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.cost_per_token_windows
(
    window_start       DateTime64(3, 'UTC'),
    window_end         DateTime64(3, 'UTC'),
    cluster            LowCardinality(String),
    namespace          LowCardinality(String),
    pod                String,
    pod_uid            String,
    team               LowCardinality(String),
    product            LowCardinality(String),
    cost_center        LowCardinality(String),
    model              LowCardinality(String),
    cost_usd           Decimal(38, 15),
    prompt_tokens      UInt64,
    completion_tokens  UInt64,
    requests           UInt64,
    cached_tokens      UInt64,
    prefill_s          Float64,
    decode_s           Float64,
    cost_per_1m_tokens Nullable(Decimal(38, 9)),
    version            UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (window_start, pod_uid, model)
SETTINGS non_replicated_deduplication_window = 10000;

-- One row per node event of gpuledger.nodes (the pod watcher's nodes: cloud identity and
-- capacity), as published: a node's history, not only its latest state. A re-read event has
-- the same (cluster, node, time, event_id) and merges away.
CREATE TABLE IF NOT EXISTS {db}.node_events
(
    cluster        LowCardinality(String),
    node           String,
    provider_id    String,
    instance_type  LowCardinality(String),
    gpus           UInt32,
    cpu_millicores UInt64,
    memory_bytes   UInt64,
    deleted        UInt8,
    time           DateTime64(3, 'UTC'),
    event_id       String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (cluster, node, time, event_id);
ALTER TABLE {db}.node_events ADD COLUMN IF NOT EXISTS gpu_capacity Map(String, UInt32);

-- One row per pod event of gpuledger.pods for a pod that requests (or requested) GPU resources:
-- from `time` on, the pod holds `requests` (empty: nothing, it finished or was deleted).
-- Owners are resolved by the worker's label policy exactly as on cost rows.
CREATE TABLE IF NOT EXISTS {db}.pod_gpu_requests
(
    cluster      LowCardinality(String),
    node         String,
    namespace    LowCardinality(String),
    pod          String,
    pod_uid      String,
    team         LowCardinality(String),
    product      LowCardinality(String),
    cost_center  LowCardinality(String),
    requests     Map(String, UInt32),
    time         DateTime64(3, 'UTC'),
    event_id     String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(time)
ORDER BY (cluster, pod_uid, time, event_id);
