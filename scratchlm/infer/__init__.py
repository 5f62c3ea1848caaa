"""The inference stage: turning a trained model's next-token logits into text.

`sample.py` holds the sampling filters (pure functions on (B, V) logits), `sample_next`, which
chains them, and a plain `generate` loop that re-runs the full forward every step.
"""
