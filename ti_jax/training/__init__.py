"""Training: `defaults` (every config field), `trainer` (the run), `train_lib` (state,
loss, step, optimizer) and `checkpointing` (the run directory and its identity).
"""
