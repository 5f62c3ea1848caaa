"""Pictures of a model's insides: `attention.py` draws attention-weight heatmaps."""
