"""The supervised fine-tuning stage: instruction data and the chat template, SFT training, evaluation
against gold answers, classification fine-tuning (LoRA and QLoRA are model parts: `scratchlm.model.lora`)."""
