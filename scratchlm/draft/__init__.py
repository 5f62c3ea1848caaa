"""The draft stage: training an EAGLE-style draft head on a target's own features (`train.py`,
`scratchlm train-draft`). The head itself and its use at inference are `scratchlm/infer/eagle.py`."""
