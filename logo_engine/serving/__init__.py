"""Serving LoGo over HTTP: ``logo serve`` (FastAPI + uvicorn) and a Ray Serve deployment.

- :mod:`~logo_engine.serving.protocol`: the wire format (OpenAI's API plus a ``logo`` field);
  pydantic only, shared with the client :class:`~logo_engine.client.RemoteEngine`.
- :mod:`~logo_engine.serving.openai_api`: requests to engine calls, results to responses.
- :mod:`~logo_engine.serving.batcher`: dynamic batching of concurrent requests.
- :mod:`~logo_engine.serving.app`: the FastAPI app; :mod:`~logo_engine.serving.server`: uvicorn.
- :mod:`~logo_engine.serving.metrics`: Prometheus metrics.
- :mod:`~logo_engine.serving.ray`: the Ray Serve deployment (extra ``[ray]``).

FastAPI, uvicorn and prometheus-client (extra ``[serve]``) are imported by the modules that need
them, never by this package itself.
"""
