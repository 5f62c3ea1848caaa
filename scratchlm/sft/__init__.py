"""The supervised fine-tuning stage: instruction data, SFT training, evaluation
against gold answers, classification fine-tuning (LoRA and QLoRA are model parts: `scratchlm.model.lora`)."""
