"""Process-level plumbing: `parallel` (every pmap idiom: replication, sharding, gathers),
`distributed` (multi-host start-up) and `fileio` (local and gs:// files, atomic writes, locks).
"""
