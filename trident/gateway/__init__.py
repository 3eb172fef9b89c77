"""Trident's HTTP gateway: OpenAI's images and videos API over the scheduler.

A separate process (``trident-gateway``, :mod:`trident.gateway.main`) that talks to
the scheduler through the SDK's :class:`~trident.client.AsyncClient`, as any client
does; it keeps no state but its job store, so several can run side by side. Modules,
one job each:

- :mod:`~trident.gateway.app`: the FastAPI app and its routes;
- :mod:`~trident.gateway.schemas`: OpenAI-shaped requests and responses, sizes and
  durations resolved against the model's limits;
- :mod:`~trident.gateway.errors`: OpenAI's error body and the table mapping
  :mod:`trident.errors` onto HTTP statuses;
- :mod:`~trident.gateway.store`: the job store (SQLite, WAL) and output files;
- :mod:`~trident.gateway.jobs`: the video job runner (claim, run, progress, cancel);
- :mod:`~trident.gateway.encode`: PNG / JPEG / WEBP (Pillow) and MP4 (H.264, PyAV).

See docs/gateway.md.
"""
