"""Training: `defaults` (every config field), `trainer` (the run, top to bottom),
`train_lib` (state, loss, step, optimizer), `checkpointing` (the run directory, its
identity and every resume check) and `validation` (validation images during training).
"""
