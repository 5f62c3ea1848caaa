"""The inference stage: turning a trained model's next-token logits into text.

`sample.py` holds the sampling filters (pure functions on (B, V) logits) and `sample_next`, which
chains them; `engine.py` the one inference engine (prefill, decode, generate on token ids) that
sampling, chat, evaluation, RL rollouts and serving reuse; `kv_cache.py` the KV cache it fills
(left padding, sliding window) and `sink_cache.py` the fixed-size attention-sink cache for
endless streams (StreamingLLM); `text.py` the text around it (prompt encoding, streaming output,
the `sample` verb) and `chat.py` the chat session.
"""
