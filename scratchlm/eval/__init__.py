"""The evaluation stage: numbers anyone can check a model with.

`loglik.py` holds the one primitive (summed log-probabilities of the last positions of rows, batched),
with lm-eval's loglikelihood and rolling-window conventions; `perplexity.py` perplexity and bits per
byte of documents; `choice.py` multiple choice with lm-eval's acc and acc_norm; `cloze.py` a cloze task
made from held-out documents, 13-gram-checked against the training split; `suite.py` the `scratchlm
eval` verb's run (held-out bits per byte, the cloze task, the verifiable task families, and the user's
own files); `lm_eval.py` the adapter that lets EleutherAI's lm-evaluation-harness score our checkpoints.
"""
