"""The gateway's upstream workers: health, load and cache facts of each ``vllm serve`` server.

``WorkerPool`` polls every worker's ``GET /health`` and ``GET /metrics`` on the gateway's
event loop (``aiohttp`` client, one session) and keeps the routing service's view in step:

* a worker is admitted after ``readmit_after`` consecutive good health checks (a new one
  after its first), and ejected after ``eject_after`` consecutive failures, counting
  requests that could not reach it; the service's replica set is the admitted workers (an
  ejected worker's tree entries are dropped: a server that comes back may have restarted
  with an empty cache, and its KV events will say what it holds);
* each admitted worker's ``/metrics`` becomes an engine report (``vllm_metrics``):
  running and waiting requests, KV usage and the prefix-cache counters; its KV capacity
  (``num_gpu_blocks`` x ``block_size``) bounds its share of the tree;
* a worker with a KV-event endpoint is subscribed once its capacity is known (the
  subscriber sizes its key map by it);
* a worker of ``dp`` data-parallel ranks is ``dp`` replicas to the router (``URL#dpR``):
  each rank has its own KV cache, load (its ``engine`` label in ``/metrics``) and
  KV-event stream (vLLM publishes rank R's at the endpoint's port + R); health and
  membership stay per server;
* ``/v1/models`` is read on admission: the gateway serves the union.

Workers can be added and removed while the gateway runs (``add``/``remove``). Memory is
O(workers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from router.gateway.config import GatewayConfig, WorkerSpec
from router.gateway.vllm_metrics import engine_report, engine_reports
from router.service import RoutingService

logger = logging.getLogger("kvroute.gateway")


@dataclass
class Worker:
    """One upstream server's state: admitted or not, the current run of good and failed
    checks, requests the gateway has in flight on it, its models and last engine report."""

    spec: WorkerSpec
    admitted: bool = False
    successes: int = 0
    failures: int = 0
    in_flight: int = 0
    ejections: int = 0
    models: list[dict] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    rank_reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    rank_in_flight: list[int] = field(default_factory=list)
    last_report_s: float | None = None
    block_size_warned: bool = False

    def __post_init__(self) -> None:
        self.rank_in_flight = [0] * self.spec.dp

    @property
    def url(self) -> str:
        return self.spec.url

    def reports(self) -> dict[str, dict[str, Any]]:
        """Replica id -> its engine report (one per data-parallel rank)."""
        if self.spec.dp == 1:
            return {self.url: self.report} if self.report else {}
        ids = self.spec.replica_ids()
        return {ids[rank]: report for rank, report in self.rank_reports.items() if rank < len(ids) and report}

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.url, "admitted": self.admitted, "in_flight": self.in_flight,
                "ejections": self.ejections, "kv_events": self.spec.kv_events, "dp": self.spec.dp,
                "models": [m.get("id") for m in self.models], "report": dict(self.report)}


class WorkerPool:
    """The workers and their polling tasks (see the module docstring). ``admitted()`` is
    what the gateway routes among. O(workers) per poll round."""

    def __init__(self, config: GatewayConfig, service: RoutingService, http: aiohttp.ClientSession) -> None:
        self.config = config
        self.service = service
        self.http = http
        self.workers: dict[str, Worker] = {}
        # replica id -> (its server, its data-parallel rank; None for a server of one rank)
        self.targets: dict[str, tuple[Worker, int | None]] = {}
        self._tasks: list[asyncio.Task] = []
        self._kv_specs: dict[str, dict] = {}
        self._adapter_bases: dict[str, str] = {}  # adapter id -> base model, of admitted workers
        for spec in config.workers:
            self._put(Worker(spec))

    # -- membership ------------------------------------------------------------------------
    def _put(self, worker: Worker) -> None:
        self.workers[worker.url] = worker
        dp = worker.spec.dp
        for rank, replica in enumerate(worker.spec.replica_ids()):
            self.targets[replica] = (worker, rank if dp > 1 else None)

    def admitted(self) -> list[str]:
        """The replica ids the gateway routes among: every rank of every admitted server."""
        return [r for w in self.workers.values() if w.admitted for r in w.spec.replica_ids()]

    def known(self) -> list[str]:
        """Every rank of every server, admitted or not (a last resort when none is)."""
        return [r for w in self.workers.values() for r in w.spec.replica_ids()]

    def in_flight(self, replica: str) -> int:
        """The gateway's requests in flight on ``replica`` (a rank, or a whole server)."""
        target = self.targets.get(replica)
        if target is None:
            return 0
        worker, rank = target
        return worker.in_flight if rank is None else worker.rank_in_flight[rank]

    def started(self, replica: str, delta: int) -> Worker | None:
        """Count a request onto (+1) or off (-1) ``replica``; its server, if known."""
        target = self.targets.get(replica)
        if target is None:
            return None
        worker, rank = target
        worker.in_flight += delta
        if rank is not None:
            worker.rank_in_flight[rank] += delta
        return worker

    def add(self, spec: WorkerSpec) -> bool:
        """Add a worker (checked and admitted by the next health round); False if known."""
        if spec.url in self.workers:
            return False
        self._put(Worker(spec))
        asyncio.get_running_loop().create_task(self._check(self.workers[spec.url]))
        return True

    def remove(self, url: str) -> bool:
        """Stop routing to ``url`` (requests in flight there finish); False if unknown."""
        worker = self.workers.pop(url, None)
        if worker is None:
            return False
        for replica in worker.spec.replica_ids():
            self.targets.pop(replica, None)
        if worker.admitted:
            self._sync()
        return True

    def adapter_base(self, model: Any) -> str:
        """The base model of ``model`` when an admitted worker serves it as a LoRA adapter
        (vLLM lists one in ``/v1/models`` with its base model as ``parent``), else "". The
        request is then keyed as the adapter's under its base model, where the engine's KV
        events put the adapter's blocks. O(1): a map rebuilt when the admitted set changes."""
        return self._adapter_bases.get(model, "") if isinstance(model, str) else ""

    def models(self) -> list[dict]:
        """The admitted workers' models, each id once."""
        seen: dict[str, dict] = {}
        for worker in self.workers.values():
            if worker.admitted:
                for model in worker.models:
                    seen.setdefault(str(model.get("id")), model)
        return list(seen.values())

    # -- health ----------------------------------------------------------------------------
    def request_failed(self, url: str) -> None:
        """A request could not reach ``url``: one failed check."""
        worker = self.workers.get(url)
        if worker is not None:
            self._failed(worker, "a request could not reach it")

    def _failed(self, worker: Worker, why: str) -> None:
        worker.successes = 0
        worker.failures += 1
        if worker.admitted and worker.failures >= self.config.eject_after:
            worker.admitted = False
            worker.ejections += 1
            logger.warning("worker %s ejected (%s)", worker.url, why)
            self._sync()

    async def _check(self, worker: Worker) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout_s)
        try:
            async with self.http.get(worker.url + "/health", timeout=timeout) as resp:
                ok = resp.status == 200
                await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            ok = False
        if self.workers.get(worker.url) is not worker:  # removed meanwhile
            return
        if not ok:
            self._failed(worker, "health check failed")
            return
        worker.failures = 0
        worker.successes += 1
        needed = self.config.readmit_after if worker.ejections else 1
        if not worker.admitted and worker.successes >= needed:
            await self._admit(worker)

    async def _admit(self, worker: Worker) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout_s)
        try:
            async with self.http.get(worker.url + "/v1/models", timeout=timeout) as resp:
                data = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            data = None
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            return  # not a vLLM OpenAI server yet (or not at all): try again next round
        worker.models = [m for m in models if isinstance(m, dict) and "id" in m]
        worker.admitted = True
        logger.info("worker %s admitted (models: %s)", worker.url, [m["id"] for m in worker.models])
        await self._scrape(worker)
        self._sync()

    # -- load ------------------------------------------------------------------------------
    async def _scrape(self, worker: Worker) -> None:
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout_s)
        try:
            async with self.http.get(worker.url + "/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, UnicodeDecodeError):
            return
        try:
            report = engine_report(text)
        except ValueError:  # not Prometheus text
            return
        models = [m.get("id") for m in worker.models]
        if "model" not in report and models:
            report["model"] = models[0]
        worker.report = report
        if worker.spec.dp > 1:
            ranks = engine_reports(text)
            # Every rank has the server's cache configuration and model, whether or not
            # its series carry them under its own engine label.
            first = ranks.get(0, {})
            for rank in range(worker.spec.dp):
                rank_report = ranks.setdefault(rank, {})
                for name in ("num_gpu_blocks", "block_size", "model"):
                    value = first.get(name) or report.get(name)
                    if value is not None:
                        rank_report.setdefault(name, value)
            worker.rank_reports = ranks
        worker.last_report_s = time.monotonic()
        if worker.admitted:
            replicas = self.service.core.replicas
            for replica, rank_report in worker.reports().items():
                if replica in replicas:
                    self.service.engine_report(replica, rank_report)
        if worker.admitted and any(self._kv_spec(worker, replica) != self._kv_specs.get(replica)
                                   for replica in worker.spec.replica_ids()):
            self._sync()

    def _kv_spec(self, worker: Worker, replica: str) -> dict | None:
        """The KV-event subscription of ``replica`` (a rank of ``worker``, or all of it)."""
        spec = worker.spec
        rank = self.targets[replica][1] if replica in self.targets else None
        report = worker.reports().get(replica, {})
        blocks = report.get("num_gpu_blocks")
        if spec.kv_events is None or not blocks:
            return None
        size = worker.report.get("block_size", self.service.options["block_size"])
        if size != self.service.options["block_size"]:
            # The router's request keys chain blocks of --block-size tokens; events of
            # another size name other keys (they would confirm nothing, or the wrong thing).
            if not worker.block_size_warned:
                worker.block_size_warned = True
                logger.warning("worker %s caches blocks of %s tokens but the gateway keys blocks of %s "
                               "(--block-size): its KV events are not used", worker.url, size,
                               self.service.options["block_size"])
            return None
        return {"endpoint": _offset_port(spec.kv_events, rank), "replay_endpoint": _offset_port(spec.replay, rank),
                "block_size": size, "model": report.get("model", ""), "topic": spec.topic, "num_gpu_blocks": blocks,
                "server_key": spec.relay_key}

    def _sync(self) -> None:
        """The service's replica set, capacities and KV subscriptions from the admitted
        workers (one replica per data-parallel rank)."""
        admitted = [w for w in self.workers.values() if w.admitted]
        self._adapter_bases = {card["id"]: card["parent"] for w in admitted for card in w.models
                               if isinstance(card.get("parent"), str) and card["parent"]
                               and card["parent"] != card["id"]}
        reports = {replica: report for w in admitted for replica, report in w.reports().items()}
        capacities = {replica: r["num_gpu_blocks"] * r["block_size"] for replica, r in reports.items()
                      if r.get("num_gpu_blocks") and r.get("block_size")}
        replicas = [replica for w in admitted for replica in w.spec.replica_ids()]
        # Every admitted worker's (1.0 included), so a worker re-added at another speed
        # replaces what the router remembers for it.
        speeds = {replica: w.spec.speed for w in admitted for replica in w.spec.replica_ids()}
        self.service.set_replicas(replicas, capacities, speeds)
        for replica, report in reports.items():
            self.service.engine_report(replica, report)
        self.service.forget_engines(set(replicas))
        specs = {replica: spec for w in admitted for replica in w.spec.replica_ids()
                 if (spec := self._kv_spec(w, replica)) is not None}
        self._kv_specs = specs
        if self.service.kv_events_enabled:
            self.service.update_kv_endpoints(specs, asyncio.get_running_loop())

    # -- polling ---------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._every(self.config.health_interval_s, self._health_round)),
                       loop.create_task(self._every(self.config.metrics_interval_s, self._metrics_round))]

    async def _every(self, interval: float, action) -> None:
        while True:
            try:
                await action()
            except Exception:  # noqa: BLE001 - a poll round must never end the polling
                logger.exception("gateway: poll round failed")
            await asyncio.sleep(interval)

    async def _health_round(self) -> None:
        await asyncio.gather(*(self._check(w) for w in list(self.workers.values())))

    async def _metrics_round(self) -> None:
        await asyncio.gather(*(self._scrape(w) for w in list(self.workers.values()) if w.admitted))

    async def wait_admitted(self, count: int, timeout: float) -> bool:
        """Until ``count`` workers are admitted (start-up, tests), at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while len(self.admitted()) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []


def _offset_port(endpoint: str | None, rank: int | None) -> str | None:
    """Where vLLM publishes data-parallel rank ``rank``'s stream of ``endpoint``: the tcp
    port plus the rank (vLLM's ``offset_endpoint_port``)."""
    if endpoint is None or not rank:
        return endpoint
    head, sep, port = endpoint.rpartition(":")
    return f"{head}:{int(port) + rank}" if sep and port.isdigit() else endpoint
