"""HTTP on the worker's web port: `GET /metrics` (Prometheus text format)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

if TYPE_CHECKING:
    from streams.stages.pipeline import Pipeline


def register(pipe: Pipeline) -> None:
    """Serve /metrics from the default Prometheus registry (the catalogue in streams.metrics)."""
    app = pipe.app

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        body = generate_latest(REGISTRY)
        return web.bytes(body, content_type=CONTENT_TYPE_LATEST.split(";")[0])
