"""Shipping a trained model: batch prediction (``predict``), the HTTP service (``app``: FastAPI,
with ``schema``, ``engines``, ``batching``), export and compression.

Nothing is imported here: FastAPI, uvicorn and onnxruntime load only with the module that
needs them."""
