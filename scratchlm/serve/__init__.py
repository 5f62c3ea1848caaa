"""Serving: an OpenAI-compatible HTTP server over continuous batching, and a chat page.

`scheduler.py` is the loop that owns the inference `Engine` and batches every request through it;
`api.py` the FastAPI app (the OpenAI endpoints, streaming, limits, metrics, the chat page in
`static/`); `stage.py` runs it with uvicorn (`scratchlm serve`).
"""
