"""The pretraining data stage: documents in, token shards and batches out."""
