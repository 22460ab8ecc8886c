"""The MoEBERT inference service: batched classification and extractive QA over HTTP (FastAPI).

Modules: settings (one pydantic Settings), schemas (request/response bodies), errors (the one place
errors become HTTP responses), metrics (Prometheus), backends (torch / ONNX Runtime), batching (the
dynamic batcher), registry (loaded models), classify / qa (handlers), app (the FastAPI app), cli.
The server never imports `training`.
"""
