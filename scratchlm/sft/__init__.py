"""The supervised fine-tuning stage: instruction data and the chat template, SFT training, LoRA and
QLoRA, evaluation against gold answers, classification fine-tuning."""
