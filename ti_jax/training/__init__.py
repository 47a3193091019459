"""Training: `config` (every config field: default, check, identity), `trainer` (the run, top to bottom), its
rooms `inputs` (images, model, prompts, latent cache, each step's batch), `concept`
(the placeholder in each text encoder) and `loop` (the loop, logs, checks,
checkpoints, signals), `train_lib` (state, loss, step, optimizer), `checkpointing`
(the run's identity and every resume check; the run directory's format is
`ti_jax.runtime.run_dir`), `validation` (validation images during training) and
`dry_run` (the inputs checked and described, nothing trained).
"""
