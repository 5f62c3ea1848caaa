"""Verifiable task families with their checkers (`families`) and gold-answer metrics (`metrics`): below
the stages, because SFT, preference data, RL rewards and evaluation all use them."""
