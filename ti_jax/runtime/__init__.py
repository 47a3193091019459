"""Process-level plumbing: `parallel` (every pmap idiom: replication, sharding, gathers),
`distributed` (multi-host start-up, the compilation cache), `fileio` (local and gs:// files,
atomic writes, locks, text files), `console` (status lines and one-line errors) and `run_dir` (the run-directory
format: workdir lock, run.json, Orbax checkpoints, a run's learned vectors).
"""
