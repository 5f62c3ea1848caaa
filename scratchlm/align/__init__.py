"""The preference-alignment stage (issue 12): preference pairs, read from files in four formats or built
from the embedded task families, tokenized with the chat template and split by prompt (`data`). The
reward model, DPO and Constitutional-AI feedback build on these pairs; their loss math belongs in
`scratchlm.losses` and their sampling in `scratchlm.infer`, as for the other stages."""
