"""Training: the loop every stage shares (`loop.py`) and what it records (`instruments.py`), optimizer
set-up, schedules, device and precision choice; and the pretraining stage (`pretrain.py`). Checkpoints live one
layer below, in `scratchlm.checkpoint`."""
