"""--mode serve: the OpenAI-compatible server on the chosen model, pruning per step under request load."""
from __future__ import annotations

import logging

from common.config import RunConfig, ServeConfig

log = logging.getLogger(__name__)


def run_serve(cfg: RunConfig, serve: ServeConfig) -> None:
    from serving.server import open_server, run_server

    server = open_server(cfg, serve)
    try:
        run_server(server, serve)
    except KeyboardInterrupt:   # uvicorn re-raises the SIGTERM/SIGINT it drained on, after the drain
        pass
    log.info("server stopped; every accepted request was answered")
