"""The training stage: the hand-written pretraining loop, optimizer set-up, schedules (checkpoints live one
layer below, in `scratchlm.checkpoint`)."""
