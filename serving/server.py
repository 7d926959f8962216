"""Build a server from the run's configs (model, engine, menu, step table, policy) and run it under uvicorn."""
from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from common.config import RunConfig, ServeConfig
from controller.serving import load_serving_policy
from environments.queueing.policies import ServePolicy, parse_policy, policy_actions
from environments.session import build_engine
from environments.queueing.step_table import StepTable
from model_loader import EMBEDDED_NAME, LoadedModel, load_model
from pruners.actions import PruningAction
from runtime.governor import ExecutionGovernor
from serving.app import ServingContext, build_app
from serving.metrics import ServerMetrics
from serving.scheduler import Scheduler
from serving.step_timing import cached_step_table, table_batches

log = logging.getLogger(__name__)


@dataclass
class Server:
    app: FastAPI
    context: ServingContext
    loaded: LoadedModel
    engine: object
    table: StepTable | None
    policy: ServePolicy


def serve_menu(cfg: ServeConfig) -> list[PruningAction]:
    """The actions a learned or slack policy may pick (--serve-actions)."""
    try:
        menu = list(dict.fromkeys(PruningAction.parse(label) for label in cfg.actions))
    except ValueError as err:
        raise ValueError(f"--serve-actions: {err}") from err
    if any(a.target == "kv_cache" for a in menu):
        raise ValueError("--serve-actions: kv_cache actions prune one prompt's cache at prefill and are not served; "
                         "use none, ffn_neurons, attention_heads or transformer_layers actions")
    return menu


def needs_table(policy: str) -> bool:
    """Slack predicts steps from the table and a checkpoint's state includes it; fixed arms do without."""
    return policy == "slack" or policy.endswith(".pt")


def open_server(run: RunConfig, cfg: ServeConfig, loaded: LoadedModel | None = None) -> Server:
    """Load the model (unless given), build the engine on the policy's actions, get the step table when the
    policy reads it, and wire scheduler and app together. The scheduler starts with the app."""
    menu = serve_menu(cfg)
    table = StepTable.load(cfg.step_table) if cfg.step_table else None
    policy = parse_policy(cfg.policy, table) if table is not None or not needs_table(cfg.policy) else None
    if policy is None and cfg.policy.endswith(".pt"):
        policy = load_serving_policy(Path(cfg.policy))
        menu = policy.menu                      # the actions it learned, whatever --serve-actions says
    if policy is None and cfg.policy != "slack":
        raise ValueError(f"--serve-policy {cfg.policy}: choose dense, static:ACTION, slack, rule:DEPTH:ACTION or a "
                         "serving checkpoint (.pt, from bench/serve_study.py --stage train)")
    loaded = loaded or load_model(run.model, device=run.device)
    setting = ExecutionGovernor(device=next(loaded.model.parameters()).device).govern()
    log.info("runtime: %s (%s machine at start; the measured thread rule of runtime.openmp)", setting.label,
             setting.state)
    actions = policy_actions(policy, menu) if policy is not None else menu
    engine = build_engine(run, loaded, actions)
    if table is None and needs_table(cfg.policy):
        contexts = tuple(c for c in cfg.table_contexts if c < loaded.context_length) or (loaded.context_length // 2,)
        table = cached_step_table(loaded.model, engine, loaded.name, menu, table_batches(cfg.max_batch), contexts,
                                  vocab=int(loaded.model.config.vocab_size),
                                  engine_key={k: getattr(run, k) for k in ("importance", "allocation", "recovery")})
    if policy is None:                          # slack, on the table just measured
        policy = parse_policy(cfg.policy, table)
    missing = [a.label for a in actions if table is not None and a.label not in table.actions]
    if missing:
        raise ValueError(f"--step-table {cfg.step_table} lacks action(s) {', '.join(missing)}: measure it with the "
                         "same --serve-actions")
    metrics = ServerMetrics()
    eos = loaded.model.generation_config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    scheduler = Scheduler(loaded.model, engine, policy, actions, cfg, table, metrics, eos)
    names = tuple(dict.fromkeys([loaded.name, run.model, *([EMBEDDED_NAME] if loaded.source == "embedded" else [])]))
    context = ServingContext(scheduler, loaded.tokenizer, names, loaded.context_length, cfg.max_tokens, metrics,
                             policy.name)
    log.info("serving %s with policy %s over %s (max batch %d, queue %d)", loaded.name, policy.name,
             ", ".join(a.label for a in actions), cfg.max_batch, cfg.max_queue)
    return Server(build_app(context), context, loaded, engine, table, policy)


def run_server(server: Server, cfg: ServeConfig) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then stops accepting, lets every open request finish, and the app's
    lifespan closes the scheduler.

    The scheduler's loop runs on this thread, the one that loaded the model and so owns the process's OpenMP
    pool (``Scheduler.keep_on_this_thread`` says why); uvicorn runs on a thread of its own, so the signals
    that stop it are caught here and handed to it.
    """
    config = uvicorn.Config(server.app, host=cfg.host, port=cfg.port, log_level="info", access_log=False)
    web = uvicorn.Server(config)
    scheduler = server.context.scheduler
    scheduler.keep_on_this_thread()

    def serve_http() -> None:
        try:
            web.run()
        finally:            # stopped, or never started (a port in use): either way the loop below must end
            scheduler.close(timeout=0)

    previous = {sig: signal.signal(sig, web.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=serve_http, name="uvicorn", daemon=True)
    http.start()
    try:
        scheduler.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    http.join()
    if not web.started:
        raise RuntimeError(f"the server did not start on {cfg.host}:{cfg.port} (the log above says why): free the "
                           "port or pass another --port")
