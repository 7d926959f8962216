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
    except KeyboardInterrupt:   # a SIGTERM/SIGINT that came before run_server had put its own handlers in place
        pass
    log.info("server stopped; every accepted request was answered")
