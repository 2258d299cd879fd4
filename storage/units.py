"""Binary size units, defined once for every layer: ``disk_gib * GiB``, ``64 * MiB``.

They live in storage/ (which hypervisor/ and containers/ already build on, and the agent
imports) rather than in the agent's shared kernel, which stays `agent.errors` and
`agent.state`: the units are a vocabulary of bytes, not of the agent.
"""
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
