"""Training: `config` (every config field: default, check, identity), `trainer` (the run,
top to bottom), `train_lib` (state, loss, step, optimizer), `checkpointing` (the run's
identity and every resume check; the run directory's format is `ti_jax.runtime.run_dir`)
and `validation` (validation images during training).
"""
