"""scratchlm: a large language model built from scratch, end to end, in PyTorch.

Folders are pipeline stages: `tokenizer/` (BPE, WordPiece, Unigram, byte, char), `data/`
(corpora, token shards, batch loading). Later stages join as they are built.
"""

__version__ = "0.1.0"
