"""The `gpuledger` command and the one-machine demo: the top layer, composing the agents and the
stream worker (docs/design.md section 7). Nothing below imports it."""
