-- Checkpoints of closed windows (design §5): the packed state of each (window, device) and
-- (window, pod) after its latest emission, so that a restart resumes from the last closed
-- window instead of replaying the retention, and a sample up to the late horizon old corrects
-- its window exactly once. Read by key, latest version first (argMax: a key's versions can
-- sit in parts of different hours). Kept by the time they were written, not their windows',
-- so a backfill of last month keeps its checkpoints as a live run does: the worker sets the
-- TTL to its late horizon plus an hour at start (ALTER ... MODIFY TTL); whole parts go.

CREATE TABLE IF NOT EXISTS {db}.window_state
(
    stage        LowCardinality(String),
    window_start DateTime64(3, 'UTC'),
    unit         String,
    version      UInt64,
    state        String CODEC(ZSTD(1)),
    source       Int32,
    owners       Array(String),
    written      DateTime('UTC') DEFAULT now()
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toStartOfHour(written)
ORDER BY (stage, unit, window_start)
TTL written + INTERVAL 18000 SECOND
SETTINGS ttl_only_drop_parts = 1, non_replicated_deduplication_window = 10000;
