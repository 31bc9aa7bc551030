"""What every gpuledger process needs at its edges, below both agents and streams: Kafka settings
and clients (`runtime.kafka`), the errors tree (`runtime.errors`) and environment-aware
command-line options (`runtime.options`). It imports only `schemas` (docs/design.md section 7).
"""
