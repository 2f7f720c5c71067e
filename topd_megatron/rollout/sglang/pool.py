"""The SGLang servers of one role (student rollouts, or teacher scoring and windows): N servers, launched or attached,
behind one sglang-router when N > 1.

    pool = start_pool(ServerConfig(model_path=..., servers=2), log_dir=run_dir / "sglang")
    pool.endpoint()        # Endpoint(url=<router or the server>, servers=[(url, key), ...], kv_tokens=...)
    pool.restart_dead()    # restarts only the launched servers that died (same port: the router finds them again)
    pool.stop()            # the router, then the servers this pool launched (by PID); attached ones keep running

Generation goes through `Endpoint.url` (the router spreads requests; its cache-aware policy keeps a rollout's windows
on the server that holds its prefix); weight updates go to every server in `Endpoint.servers` directly. Launched
servers start in parallel and share one API key (generated when they listen beyond loopback), which the router
presents to them.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from topd_megatron.rollout.sglang.client import SGLangClient
from topd_megatron.rollout.sglang.router import RouterProcess, launch_router
from topd_megatron.rollout.sglang.server import LOOPBACK, ServerConfig, SGLangServer, start_server, wait_healthy


@dataclass(kw_only=True, slots=True)
class Endpoint:
    """Where a role's requests go (picklable: rank 0 broadcasts it to every rank)."""

    url: str
    """The router when the role has several servers, else its one server."""
    api_key: str | None = field(repr=False)
    """What a client of `url` presents (a router in front of keyed servers requires their key too)."""
    servers: list[tuple[str, str | None]] = field(default_factory=list)
    """Every server of the role: (url, API key), for weight updates and health checks."""
    kv_tokens: int = 0
    """KV-cache tokens of one server (SGLang's max_total_num_tokens; 0 when it did not say)."""


@dataclass(kw_only=True, slots=True)
class ServerPool:
    role: str
    servers: list[SGLangServer]
    router: RouterProcess | None
    kv_tokens: int = 0
    router_key: str | None = field(default=None, repr=False)
    """The key the router requires of its clients: the servers' key, or one of its own when it listens beyond
    loopback in front of servers without one."""

    def endpoint(self) -> Endpoint:
        url = self.router.url if self.router is not None else self.servers[0].url
        key = self.router_key if self.router is not None else self.servers[0].api_key
        return Endpoint(
            url=url, api_key=key, servers=[(s.url, s.api_key) for s in self.servers], kv_tokens=self.kv_tokens
        )

    def restart_dead(self) -> int:
        """Restart every launched server that exited or fails its health check; returns how many."""
        restarted = 0
        for i, server in enumerate(self.servers):
            if server.alive() and SGLangClient(server.url, api_key=server.api_key).healthy():
                continue
            self.servers[i] = server.restart()
            restarted += 1
        return restarted

    def stop(self) -> None:
        if self.router is not None:
            self.router.stop()
        for server in self.servers:
            server.stop()


def kv_tokens(info: object) -> int:
    """max_total_num_tokens of a /server_info answer (top level, or the first scheduler's internal state); 0 if
    absent."""
    if not isinstance(info, dict):
        return 0
    states = info.get("internal_states") or [{}]
    value = info.get("max_total_num_tokens") or (states[0] or {}).get("max_total_num_tokens")
    return int(value or 0)


def _server_configs(cfg: ServerConfig) -> list[tuple[ServerConfig, str | None]]:
    """One (config, API key) per server of the role: attached URLs, or `servers` launches sharing one key (the
    configured one; generated when they listen beyond loopback), ports port, port + 1, ..."""
    key = cfg.read_api_key()
    if cfg.urls or cfg.url:
        return [(dataclasses.replace(cfg, url=u, urls=(), servers=1), key) for u in (cfg.urls or (cfg.url,))]
    if key is None and cfg.host not in LOOPBACK:
        key = secrets.token_urlsafe(24)  # one key for the role: the router presents it to every server
    ports = [cfg.port + i if cfg.port else 0 for i in range(cfg.servers)]
    return [(dataclasses.replace(cfg, port=port, servers=1), key) for port in ports]


def start_pool(
    cfg: ServerConfig, *, log_dir: str | Path, policy: str = "cache_aware", router_host: str = "127.0.0.1"
) -> ServerPool:
    """Launch (or attach to) the role's servers, wait for every one of them, then start the router over them, on
    `router_host` (an address every rank of the trainer reaches: rank 0's node address when it spans nodes)."""
    servers: list[SGLangServer] = []
    try:
        for one, key in _server_configs(cfg):
            servers.append(
                SGLangServer(one, one.url.rstrip("/"), key, None, None)
                if one.url
                else start_server(one, log_dir=log_dir, api_key=key)
            )
        for server in servers:
            wait_healthy(server, cfg.startup_timeout_s)
        kv = kv_tokens(SGLangClient(servers[0].url, api_key=servers[0].api_key).get("/server_info"))
        router, router_key = None, servers[0].api_key
        if len(servers) > 1:
            if router_key is None and router_host not in LOOPBACK:
                router_key = secrets.token_urlsafe(24)  # reachable from other nodes: never without a key
            router = launch_router(
                [s.url for s in servers],
                role=cfg.role,
                log_dir=log_dir,
                policy=policy,
                api_key=router_key,
                host=router_host,
                strip_env=(cfg.api_key_env,) if cfg.api_key_env else (),
            )
        return ServerPool(role=cfg.role, servers=servers, router=router, kv_tokens=kv, router_key=router_key)
    except BaseException:
        for server in servers:
            server.stop(grace_s=5.0)
        raise
