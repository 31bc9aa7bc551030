"""How far back in event time the worker still bills a sample (design §5).

Agents buffer what Kafka has not acknowledged (`AGENT_BUFFER_EVENTS` events by default) and send
it, oldest first, once the broker is back. The worker takes such samples as corrections of the
windows they belong to for `LATE_HORIZON_S` after a window's end; only older ones are
dead-lettered as `too_late`. The default horizon covers the default buffer of an 8-GPU node
sampled at 1 Hz (100,000 / 8 = 12,500 s, about 3.5 h), rounded up to 4 h.
"""

from __future__ import annotations

AGENT_BUFFER_EVENTS = 100_000
LATE_HORIZON_S = 4 * 3600
# The pods topic keeps every pod event for 7 days (min.compaction.lag.ms, runtime.kafka): a
# window corrected later could read metadata its first emission did not see.
MAX_LATE_HORIZON_S = 7 * 24 * 3600
