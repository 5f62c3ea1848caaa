"""Online reinforcement learning from rewards (PPO, GRPO): the loss math in `losses`."""
