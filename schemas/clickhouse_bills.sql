-- Provider bills (FOCUS Cost and Usage rows as the provider exported them) and the true-up of
-- metered GPU cost to them (design §11, streams/billing/). {db} is the database name.
--
-- A bill is kept per slice: one (provider, billing account, billing period start). Every import
-- that changes a slice writes all of the slice's lines, then its true-up rows, under the next
-- version, and last the slice's row in bill_versions: a version without that row was never
-- finished and nobody reads it. Readers take, per slice, the highest version in bill_versions.
-- Re-importing the same lines (same fingerprint) writes nothing.

CREATE TABLE IF NOT EXISTS {db}.bill_versions
(
    slice                String,
    provider             LowCardinality(String),
    billing_account_id   String,
    billing_period_start DateTime('UTC'),
    billing_period_end   DateTime('UTC'),
    billing_currency     LowCardinality(String),
    version              UInt64,
    fingerprint          String,
    lines                UInt64,
    changed_periods      UInt64,
    source_files         Array(String),
    imported_at          DateTime64(3, 'UTC'),
    non_gpu_rule         LowCardinality(String) DEFAULT ''
)
ENGINE = ReplacingMergeTree
ORDER BY (slice, version);

CREATE TABLE IF NOT EXISTS {db}.bill_lines
(
    slice               String,
    version             UInt64,
    line_no             UInt64,
    source              String,
    charge_period_start DateTime('UTC'),
    charge_period_end   DateTime('UTC'),
    charge_category     LowCardinality(String),
    charge_class        LowCardinality(String),
    resource_id         String,
    resource_name       String,
    resource_key        String,
    instance_type       LowCardinality(String),
    gpu_instance        UInt8,
    service_name        LowCardinality(String),
    sku_id              String,
    region_id           LowCardinality(String),
    billed_cost         Decimal(38, 15),
    effective_cost      Decimal(38, 15),
    list_cost           Decimal(38, 15),
    billing_currency    LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(charge_period_start)
ORDER BY (slice, version, line_no);

-- The true-up: each bill line of a metered GPU node allocated over that line's metered rows (the
-- dimensions of gpu_cost_hourly), by their share of the node's metered cost. kind is the
-- metered row's kind (usage, idle, host), or `non_gpu` (the part of a GPU instance that the
-- non-GPU rule keeps off the GPU users) or `unmetered` (a GPU instance on the bill with no
-- metering in the line's charge period; node, device and owner columns empty).
CREATE TABLE IF NOT EXISTS {db}.billed_cost_hourly
(
    slice            String,
    version          UInt64,
    hour             DateTime('UTC'),
    resource_key     String,
    instance_type    LowCardinality(String),
    cluster          LowCardinality(String),
    node             LowCardinality(String),
    device_uuid      String,
    gpu_model        LowCardinality(String),
    mig_profile      LowCardinality(String),
    pricing          LowCardinality(String),
    price_per_hour   Decimal(38, 15),
    namespace        LowCardinality(String),
    pod              String,
    pod_uid          String,
    team             LowCardinality(String),
    product          LowCardinality(String),
    cost_center      LowCardinality(String),
    kind             LowCardinality(String),
    device_seconds   Float64,
    metered_cost_usd Decimal(38, 15),
    effective_cost   Decimal(38, 15),
    billed_cost      Decimal(38, 15),
    billing_currency LowCardinality(String)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (slice, version, hour, resource_key, device_uuid, pod_uid, kind, team, product,
          cost_center, namespace, pod, pricing, price_per_hour, cluster, node, gpu_model,
          mig_profile, instance_type);
