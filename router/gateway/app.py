"""``kvroute gateway``: an OpenAI-compatible HTTP gateway in front of ``vllm serve`` workers.

The second front door over ``router.service.RoutingService`` (the first is the Ray Serve
plug-in). Per request, on one ``aiohttp`` event loop:

1. the body is read up to ``max_body_bytes`` (413 beyond) and validated by the same
   parsers as kvroute's Serve ingress (``engines.protocol``: the same 4xx and messages);
   a ``model`` no admitted worker serves is a 404;
2. the service parses it, takes its token ids from the piece cache (with ``--tokenizer``;
   else character keys), keys it and ranks the admitted workers; the first tier's worker
   with the fewest requests in flight from this gateway gets it. The request never waits
   for the tokenizer: long text the cache has not seen is left out of the keys (they
   cover the cached leading pieces) and encoded on the tokenizer pool after the decision,
   and the tree learns the whole prompt on that worker then;
3. the client's bytes are forwarded unchanged. A non-streaming answer is read whole, then
   returned; a stream is passed through chunk by chunk as it arrives (never buffered
   whole). Until the first byte has reached the client, a worker that cannot be reached,
   fails, or answers 502/503/504 is counted against its health and the request is ranked
   again among the other workers (``max_attempts`` in all); after it, a failure ends the
   stream with an in-band error event;
4. the service learns the routing (speculative tree entries, session, load), the first
   byte (the request is then running) and the end.

``GET /v1/models`` (the admitted workers' union), ``GET /health``, ``GET /metrics``
(Prometheus: the router's metrics, the same names as the Serve plug-in's, plus the
gateway's own) are served beside. An admin listener bound to 127.0.0.1 only
(``admin_port``) lists, adds and removes workers at run time. On SIGTERM/SIGINT the
gateway stops accepting connections and drains the requests in flight (up to
``drain_timeout_s``) before it exits.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import time
import uuid

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engines.errors import BadRequest
from engines.protocol import parse_chat, parse_completion, read_json_body, session_of
from router.gateway.config import GatewayConfig, WorkerSpec
from router.gateway.workers import WorkerPool
from router.metrics import prometheus_metric_factory
from router.service import Tokenized
from router.errors import ConfigError

logger = logging.getLogger("kvroute.gateway")

#: Upstream answers after which the request is tried on another worker, if nothing has
#: reached the client yet (the worker is overloaded, starting or behind a failing proxy).
RETRY_STATUSES = frozenset({502, 503, 504})
_ENDPOINTS = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completion}
_HOP_HEADERS = {"content-type", "cache-control"}
#: Idle upstream connections are closed after this many seconds, before the worker closes
#: them: vLLM's server drops an idle keep-alive connection after 5 s
#: (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), and a POST written on a connection the worker is closing
#: at that moment fails with "Server disconnected" before any answer, which counts against
#: a healthy worker (aiohttp's own default keeps them 15 s).
UPSTREAM_KEEPALIVE_S = 3.0
#: Every forwarded answer names the worker that served it (operators' debugging, tests):
#: its URL, with ``#dpR`` for a data-parallel rank.
WORKER_HEADER = "x-kvroute-worker"
#: vLLM's OpenAI server runs a request on this data-parallel rank (``_get_data_parallel_rank``).
DP_RANK_HEADER = "X-data-parallel-rank"
#: The loop-lag probe's period. Each probe samples the lag a request arriving at that
#: instant would meet, so the histogram estimates that at any rate; this one keeps its
#: cost negligible: a wake-up of an idle gateway cost about 175 us of CPU on this 2-vCPU
#: machine (0.21 s of CPU a 30 s idle at 40 probes a second), CPU that beside engines on
#: the same cores is taken from them.
LOOP_PROBE_S = 0.25


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(BadRequest(status, message, param=param).to_openai() if status < 500 else
                             {"error": {"message": message, "type": "server_error", "param": param, "code": status}},
                             status=status)


class _Upstream(Exception):
    """A worker failed before anything reached the client: try another."""


class GatewayMetrics:
    """The gateway's own Prometheus series (beside the router's): requests by endpoint and
    status, retries, upstream failures by worker, client disconnects, admitted workers,
    requests in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("kvroute_gateway_requests", "Requests answered, by endpoint and HTTP status.",
                                ("endpoint", "status"), registry=registry)
        self.retries = Counter("kvroute_gateway_retries", "Requests sent to another worker after one failed "
                               "before any byte reached the client.", registry=registry)
        self.upstream_failures = Counter("kvroute_gateway_upstream_failures",
                                         "Requests a worker failed (unreachable, 5xx, broken stream).",
                                         ("worker",), registry=registry)
        self.client_disconnects = Counter("kvroute_gateway_client_disconnects",
                                          "Streams whose client closed the connection before the last "
                                          "chunk was sent.", registry=registry)
        self.workers = Gauge("kvroute_gateway_workers_admitted", "Workers the gateway routes to.",
                             registry=registry)
        self.in_flight = Gauge("kvroute_gateway_in_flight", "Requests in flight through the gateway.",
                               registry=registry)
        self.seconds = Histogram("kvroute_gateway_request_seconds", "Time from the body read to the last byte "
                                 "sent, by endpoint.", ("endpoint",), registry=registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        # The gateway's own share of a request's time to first byte, and the loop's
        # lateness (what every request waiting to be read or relayed meanwhile waited):
        # the two figures to look at when a gateway's TTFT is above a direct call's.
        self.added = Histogram("kvroute_gateway_added_seconds", "Time the gateway's handler adds to a request's "
                               "first byte: from its start (the body read, parsed, routed) to the worker's request "
                               "sent, plus from the worker's first bytes to a stream's first chunk written to the "
                               "client (a whole answer: to its response built).", registry=registry,
                               buckets=(5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 0.01,
                                        0.025, 0.05, 0.1, 0.25))
        self.loop_lag = Histogram("kvroute_gateway_loop_lag_seconds", "How late the event loop ran a timer that "
                                  f"was due (one every {LOOP_PROBE_S * 1e3:.0f} ms; uvloop's timers tick in "
                                  "milliseconds, so below 1 ms this is mostly their rounding).", registry=registry,
                                  buckets=(2.5e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


class Gateway:
    """One gateway: the routing service, the worker pool, the HTTP client session and the
    listeners. ``start()`` binds (port 0: any free one, see ``port``) and starts polling;
    ``stop()`` stops accepting, drains and closes. Per request: O(body) parse and keying
    plus the service's rank; memory O(workers + requests in flight) beyond the service's
    bounded tables."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.service = config.service(prometheus_metric_factory(self.registry))
        self.gauges = GatewayMetrics(self.registry)
        self.http: aiohttp.ClientSession | None = None
        self.pool: WorkerPool | None = None
        self.in_flight = 0
        self.retries = 0
        self._runners: list[web.AppRunner] = []
        self.port: int | None = None
        self.admin_port: int | None = None
        self._stopping = False
        self._probe: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def _apps(self) -> tuple[web.Application, web.Application]:
        app = web.Application(client_max_size=self.config.max_body_bytes + 1)
        for path in _ENDPOINTS:
            app.router.add_post(path, self.handle_completion)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        admin = web.Application()
        admin.router.add_get("/admin/workers", self.handle_list_workers)
        admin.router.add_post("/admin/workers", self.handle_add_worker)
        admin.router.add_delete("/admin/workers", self.handle_remove_worker)
        return app, admin

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=UPSTREAM_KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=self.config.request_timeout_s,
                                          connect=self.config.connect_timeout_s))
        self.pool = WorkerPool(self.config, self.service, self.http)
        self.pool.start()
        app, admin = self._apps()
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=self.config.drain_timeout_s,
                               access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        await site.start()
        self._runners.append(runner)
        self.port = runner.addresses[0][1]
        admin_runner = web.AppRunner(admin, handle_signals=False, access_log=None)
        await admin_runner.setup()
        await web.TCPSite(admin_runner, "127.0.0.1", self.config.admin_port).start()
        self._runners.append(admin_runner)
        self.admin_port = admin_runner.addresses[0][1]
        self._probe = asyncio.get_running_loop().create_task(self._probe_loop_lag())

    async def _probe_loop_lag(self) -> None:
        observe, clock = self.gauges.loop_lag.observe, time.perf_counter
        while True:
            due = clock() + LOOP_PROBE_S
            await asyncio.sleep(LOOP_PROBE_S)
            observe(max(0.0, clock() - due))

    async def stop(self) -> None:
        """Stop accepting, let the requests in flight finish (``drain_timeout_s`` at most),
        then close the upstream session, the pollers and the KV-event subscribers."""
        self._stopping = True
        if self._probe is not None:
            self._probe.cancel()
        for runner in self._runners:  # stops listening, then waits for running handlers
            await runner.cleanup()
        self._runners = []
        if self.pool is not None:
            await self.pool.stop()
        if self.http is not None:
            await self.http.close()
        self.service.close()

    # -- handlers --------------------------------------------------------------------------
    async def handle_health(self, request: web.Request) -> web.Response:
        admitted = len(self.pool.admitted())
        status = 200 if admitted else 503
        return web.json_response({"status": "ok" if admitted else "no worker admitted", "workers": admitted},
                                 status=status)

    async def handle_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.pool.models()})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        self.service.flush_metrics()
        self.gauges.workers.set(len(self.pool.admitted()))
        self.gauges.in_flight.set(self.in_flight)
        return web.Response(body=generate_latest(self.registry), headers={"content-type": CONTENT_TYPE_LATEST})

    async def handle_list_workers(self, request: web.Request) -> web.Response:
        """Each worker's state, with what the router believes it caches (tree blocks, of
        them speculative: learned from routing, not yet confirmed by a KV event) and its
        KV-event stream's counters (per rank, under ``ranks``, for a data-parallel
        server); the gateway's retries and the KV-event totals."""
        core, streams = self.service.core, self.service.kv_stream_stats()
        rows = []

        def cache_of(replica: str) -> dict:
            out: dict = {}
            if replica in core.replicas:
                stats = core.tree.stats(replica)
                out["tree"] = {"blocks": stats["blocks"], "speculative": stats["speculative"]}
            if replica in streams:
                out["kv_stream"] = {k: v for k, v in streams[replica].items()
                                    if isinstance(v, (int, float, bool, str)) or v is None}
            return out

        for worker in self.pool.workers.values():
            row = worker.as_dict()
            if worker.spec.dp == 1:
                row.update(cache_of(worker.url))
            else:  # per data-parallel rank
                row["ranks"] = {replica: {"in_flight": self.pool.in_flight(replica), **cache_of(replica)}
                                for replica in worker.spec.replica_ids()}
            rows.append(row)
        return web.json_response({"workers": rows, "retries": self.retries, "in_flight": self.in_flight,
                                  "kv_events": self.service.kv_event_stats()})

    async def handle_add_worker(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
            spec = WorkerSpec.parse(data.get("worker") if isinstance(data, dict) and "worker" in data else data)
        except (ValueError, ConfigError) as exc:
            return _error(400, f"bad worker: {exc}")
        added = self.pool.add(spec)
        return web.json_response({"added": added, "url": spec.url}, status=201 if added else 200)

    async def handle_remove_worker(self, request: web.Request) -> web.Response:
        url = request.query.get("url", "").rstrip("/")
        if not self.pool.remove(url):
            return _error(404, f"no worker {url!r}", param="url")
        return web.json_response({"removed": url})

    async def _read_body(self, request: web.Request) -> tuple[bytes, dict]:
        return await read_json_body(request.content.iter_any(), request.content_length, self.config.max_body_bytes)

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is None:
            return
        served = [str(m.get("id")) for m in self.pool.models()]
        if model not in served:
            raise BadRequest(404, f"The model '{model}' does not exist (served: {', '.join(served) or 'none yet'})",
                             param="model")

    async def handle_completion(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.path
        started = time.perf_counter()
        try:
            raw, body = await self._read_body(request)
            params = _ENDPOINTS[endpoint](body)
            self._check_model(body)
        except BadRequest as exc:
            self.gauges.requests.labels(endpoint, str(exc.status)).inc()
            return web.json_response(exc.to_openai(), status=exc.status)
        self.in_flight += 1
        try:
            response = await self._route_and_forward(request, endpoint, raw, body, bool(params.stream), started)
        finally:
            self.in_flight -= 1
        self.gauges.requests.labels(endpoint, str(response.status)).inc()
        self.gauges.seconds.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def _route_and_forward(self, request: web.Request, endpoint: str, raw: bytes, body: dict,
                                 stream: bool, started: float) -> web.StreamResponse:
        began = started  # for the added time; ``started`` moves past the tokenizer wait (decision latency)
        service = self.service
        service.schedule_metrics_flush()
        session = session_of(request.headers, body)
        routing_body = body if session is None or body.get("session_id") == session else \
            {**body, "session_id": session}
        base = self.pool.adapter_base(body.get("model"))
        if base:  # a LoRA adapter: keyed as the adapter, under its base model
            routing_body = {**routing_body, "model": base}
        fields = service.parse(routing_body, lora=body["model"] if base else "")
        # The body goes to the worker as it came (the server tokenizes it), so the ids
        # are only for keys: a turn that extends a cached conversation is keyed on its
        # cached leading pieces at once, its new text encoded on the pool meanwhile and
        # learned for the next turn; a prompt mostly new waits for the pool, at most
        # ``tokenize_wait_ms`` (``RoutingService.tokenized``).
        found = Tokenized(None)
        if fields is not None and fields.tokenize:
            found = await service.tokenized(fields, service.options["tokenize_wait_ms"] / 1000, ids_wanted=False)
            # The wait for the pool is a metric of its own, not the decision's latency (as
            # in the Serve plug-in): the loop served other requests meanwhile.
            service.record_wait(found.waited)
            started += found.waited
        learn = found.lesson(fields)
        tried: set[str] = set()
        last_error = "no worker admitted"
        pool = self.pool
        for attempt in range(1, self.config.max_attempts + 1):
            candidates = [r for r in pool.admitted() if r not in tried]
            admitted = bool(candidates)
            if not admitted:
                # No admitted worker left for this request (all ejected, e.g. health checks
                # timing out on overloaded servers): try the known ones before failing it.
                candidates = [r for r in pool.known() if r not in tried]
            if not candidates:
                break
            request_id = uuid.uuid4().hex
            if fields is None or not admitted:
                service.record_fallback()
                tier = candidates
            else:
                routed = service.keyed(fields, found, request_id)
                tiers = service.rank(routed, candidates, started, learn=learn)
                tier = tiers[0] if tiers else candidates
            replica = min(tier, key=pool.in_flight)
            service.routed(request_id, replica)
            worker = pool.started(replica, +1)
            try:
                if worker is None:
                    raise _Upstream("the worker was removed")
                rank = pool.targets[replica][1] if replica in pool.targets else None
                return await self._forward(request, worker.url, rank, replica, endpoint, raw, stream, request_id,
                                           began)
            except _Upstream as exc:
                last_error = str(exc)
                # A server that failed fails for all its ranks: try another server.
                tried.update(worker.spec.replica_ids() if worker is not None else [replica])
                if worker is not None:
                    self.gauges.upstream_failures.labels(worker.url).inc()
                    pool.request_failed(worker.url)
                if attempt < self.config.max_attempts:
                    self.retries += 1
                    self.gauges.retries.inc()
                    logger.warning("worker %s failed before answering (%s); retry %d", replica, exc, attempt)
            finally:
                if worker is not None:
                    pool.started(replica, -1)
                service.completed(request_id)
            # A retry's decision and added time start now (the failed worker's wait was not the gateway's).
            started = began = time.perf_counter()
        return _error(503, f"no worker could serve the request: {last_error}")

    async def _forward(self, request: web.Request, url: str, rank: int | None, replica: str, endpoint: str,
                       raw: bytes, stream: bool, request_id: str, began: float) -> web.StreamResponse:
        """Send ``raw`` to ``url`` (to its data-parallel rank ``rank``, when not None:
        vLLM's ``X-data-parallel-rank`` header); raise ``_Upstream`` while nothing reached
        the client. ``began``: when the request's handler started (for the added time)."""
        headers = {"content-type": "application/json"}
        if rank is not None:
            headers[DP_RANK_HEADER] = str(rank)
        if request.headers.get("authorization"):
            headers["authorization"] = request.headers["authorization"]
        before_send = time.perf_counter() - began
        try:
            upstream = await self.http.post(url + endpoint, data=raw, headers=headers)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _Upstream(f"{type(exc).__name__}: {exc}") from None
        try:
            if upstream.status in RETRY_STATUSES:
                raise _Upstream(f"HTTP {upstream.status}")
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() in _HOP_HEADERS}
            out_headers[WORKER_HEADER] = replica
            if not stream or upstream.status != 200:
                try:
                    payload = await upstream.read()
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    raise _Upstream(f"{type(exc).__name__} while reading the answer") from None
                answered = time.perf_counter()
                self.service.first_token(request_id)
                response = web.Response(status=upstream.status, body=payload, headers=out_headers)
                self.gauges.added.observe(before_send + time.perf_counter() - answered)
                return response
            chunks = upstream.content.iter_any()
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                first = b""
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise _Upstream(f"{type(exc).__name__} before the first chunk") from None
            answered = time.perf_counter()
            self.service.first_token(request_id)
            response = web.StreamResponse(status=200, headers=out_headers)
            await response.prepare(request)
            try:
                try:
                    if first:
                        await response.write(first)
                    self.gauges.added.observe(before_send + time.perf_counter() - answered)
                    async for chunk in chunks:
                        await response.write(chunk)
                except ConnectionResetError:
                    raise  # a write to the client failed: the client left (below), not the worker
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    # After the status line: report in-band, then end (a retry would repeat output).
                    self.gauges.upstream_failures.labels(url).inc()
                    error = {"error": {"message": f"worker failed mid-stream: {type(exc).__name__}",
                                       "type": "server_error", "param": None, "code": 502}}
                    await response.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
                await response.write_eof()
            except ConnectionResetError:
                # The client left: mid-stream, or (as most clients do) right after reading
                # "data: [DONE]", before the chunked body's last empty chunk. Nothing is left
                # to send and nothing went wrong here: counted, not logged (aiohttp would log
                # a traceback per request). Releasing the upstream response closes its
                # connection, which aborts the request on the worker if it still generates.
                self.gauges.client_disconnects.inc()
            return response
        finally:
            upstream.release()


async def serve(config: GatewayConfig, *, ready=None) -> None:
    """Run a gateway until SIGTERM or SIGINT, then drain and stop. ``ready(gateway)`` is
    called once it listens."""
    gateway = Gateway(config)
    await gateway.start()
    # What start-up built (imported modules, the tokenizer and its template, about 370k
    # objects with ``--tokenizer``) lives as long as the process: moved out of the
    # collector's reach, a full collection during serving no longer walks it (one took up
    # to 200 ms on a 2-vCPU machine, the loop stopped meanwhile). The routing service
    # froze the heap once its tokenizer loaded (``router.heap``); this adds what the
    # server's start brought.
    if config.routing.get("gc_freeze", True):
        gc.collect()
        gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"kvroute gateway listening on http://{config.host}:{gateway.port} "
          f"(admin: http://127.0.0.1:{gateway.admin_port}), {len(config.workers)} workers, "
          f"policy {config.routing.get('policy')}, event loop {type(loop).__module__.split('.')[0]}", flush=True)
    if ready is not None:
        ready(gateway)
    await stop.wait()
    print(f"kvroute gateway: draining {gateway.in_flight} requests in flight", flush=True)
    await gateway.stop()
    print("kvroute gateway stopped", flush=True)
