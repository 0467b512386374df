"""OpenAI-compatible HTTP ingress in front of the vLLM engine deployment.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``"stream":
true`` for SSE) and ``GET /v1/models``. The ingress parses and validates the body
(malformed JSON, missing ``messages``/``prompt``, bad field types -> 400; unknown
``model`` -> 404), takes the session id from the ``x-session-id`` header, else body
``session_id``, else ``user``, stores it in the body as ``session_id`` and forwards that
dict (as ``engines.protocol.RequestBody``, a dict that also answers ``.messages`` /
``.prompt``, so Ray's own ``PrefixCacheAffinityRouter`` can route it too) to the engine
deployment: ``handle.chat.remote(body)`` or ``handle.options(stream=True).chat.remote(body)``.
When the engine replica dies before anything reached the client (a non-streaming call, or a
stream before its first chunk), the call is sent again and routed among the live replicas,
up to ``MAX_ATTEMPTS`` in all; ``GET /kvroute/stats`` counts those retries. Errors found
by the engine (prompt longer than the context -> 400) come back as ``BadRequest`` and get
the same OpenAI error body. A request router on the engine deployment therefore sees the
body dict as ``pending_request.args[0]``.

    app = build_app(build_tiny_model(), num_replicas=2,
                    request_router_config={"request_router_class": "router:CacheAwareRouter"})
    serve.run(app)
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from engines.errors import BadRequest, find_bad_request
from engines.protocol import RequestBody, parse_chat, parse_completion, read_json_body, session_of

logger = logging.getLogger("kvroute.engines")

#: Environment for engine replicas unless the caller overrides it: a 1 GiB KV cache on CPU
#: (vLLM's default takes a share of RAM), and no OpenMP core pinning (every replica on a
#: small machine would pin the same core).
DEFAULT_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}

#: Attempts per request when the engine replica serving it dies before anything was sent
#: to the client (the first try plus two retries, each routed afresh among live replicas).
MAX_ATTEMPTS = 3

app = FastAPI(title="kvroute OpenAI ingress")


def is_replica_loss(exc: BaseException) -> bool:
    """Whether ``exc`` says the engine replica went away (its actor died or became
    unreachable) rather than that the request failed: only then is a retry safe."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, (RayActorError, ActorUnavailableError)):
            return True
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
        seen += 1
    return False


#: Larger bodies get a 413 before they are parsed: a million-token prompt is about 4 MB of
#: JSON, so this leaves room while bounding what one request can make the ingress hold.
MAX_BODY_BYTES = 32 * 1024 * 1024


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(BadRequest(status, message, param=param).to_openai(), status_code=status)


def _from_exception(exc: BaseException) -> JSONResponse:
    bad = find_bad_request(exc)
    if bad is not None:
        return JSONResponse(bad.to_openai(), status_code=bad.status)
    return JSONResponse(_internal_error(exc), status_code=500)


def _internal_error(exc: BaseException) -> dict:
    """An OpenAI error body for an unexpected failure. The client gets an id to quote, not
    the exception's text (which can carry engine internals); the log has the details."""
    error_id = uuid.uuid4().hex[:12]
    logger.error("engine call failed [error id %s]", error_id, exc_info=exc)
    return {"error": {"message": f"internal error (id {error_id}): the engine call failed; the server log has "
                                 "the details", "type": "internal_error", "param": None, "code": 500}}


@serve.deployment(name="OpenAIIngress", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(app)
class OpenAIIngress:
    """HTTP front end; ``engine`` is the engine deployment's handle, ``model_name`` the
    served model's name (checked here so an unknown model costs no routing)."""

    max_body_bytes = MAX_BODY_BYTES

    def __init__(self, engine: DeploymentHandle, model_name: str, model_aliases: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self.model_name = model_name
        self.model_names = {model_name, *model_aliases}
        self.retries = 0  # requests re-sent after their replica was lost (see ``_call``)

    async def _body(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        length = int(declared) if declared is not None and declared.isdigit() else None
        return (await read_json_body(request.stream(), length, self.max_body_bytes))[1]

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model not in self.model_names:
            raise BadRequest(404, f"The model '{model}' does not exist (served: '{self.model_name}')", param="model")

    async def _forward(self, method: str, request: Request, parse) -> Any:
        try:
            body = await self._body(request)
            params = parse(body)
            self._check_model(body)
            session = session_of(request.headers, body)
        except BadRequest as exc:
            return JSONResponse(exc.to_openai(), status_code=exc.status)
        if session is not None:
            body["session_id"] = session
        else:
            body.pop("session_id", None)
        body = RequestBody(body)
        if not params.stream:
            return await self._call(method, body)
        return await self._call_streaming(method, body)

    async def _call(self, method: str, body: RequestBody) -> JSONResponse:
        """A non-streaming call. Nothing reaches the client before the whole answer, so a
        replica lost mid-request is retried on another (up to ``MAX_ATTEMPTS``)."""
        attempt = 1
        while True:
            try:
                return JSONResponse(await getattr(self.engine, method).remote(body))
            except Exception as exc:
                if attempt >= MAX_ATTEMPTS or not is_replica_loss(exc):
                    return _from_exception(exc)
                self.retries += 1
                logger.warning("replica lost before answering (%s); retry %d", type(exc).__name__, attempt)
                attempt += 1

    async def _call_streaming(self, method: str, body: RequestBody):
        """A streaming call: retried on another replica while nothing has been streamed
        (the first chunk not yet received); once the client has bytes, a lost replica
        ends the stream with an in-band error instead (a retry would repeat output)."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            gen = getattr(self.engine.options(stream=True), method).remote(body)
            try:
                first = await gen.__anext__()
                break
            except StopAsyncIteration:
                first = None
                break
            except Exception as exc:
                if attempt < MAX_ATTEMPTS and is_replica_loss(exc):
                    self.retries += 1
                    logger.warning("replica lost before the first chunk (%s); retry %d",
                                   type(exc).__name__, attempt)
                    continue
                return _from_exception(exc)

        async def chunks():
            if first is not None:
                yield first
            try:
                async for chunk in gen:
                    yield chunk
            except Exception as exc:  # after the status line: report in-band, then end
                bad = find_bad_request(exc)
                error = bad.to_openai() if bad is not None else _internal_error(exc)
                yield f"data: {json.dumps(error)}\n\n"
                yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._forward("chat", request, parse_chat)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._forward("completions", request, parse_completion)

    @app.get("/v1/models")
    async def models(self):
        try:
            return JSONResponse(await self.engine.models.remote())
        except Exception as exc:
            return _from_exception(exc)

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/kvroute/stats")
    async def stats(self):
        """Ingress counters: ``retries`` (requests re-sent after a lost replica)."""
        return {"retries": self.retries}

    @app.get("/kvroute/engines")
    async def engines(self):
        """Every engine replica's routing-stats report (``VLLMEngine.record_routing_stats``:
        load, KV cache size, cumulative prefix-cache counters, requests scheduled), asked of
        each replica directly (Serve's broadcast, not routed). A replica that does not
        answer within 10 s is listed with its error."""
        try:
            results = await self.engine.broadcast("record_routing_stats").results_async(
                timeout_s=10.0, return_exceptions=True)
        except Exception as exc:  # noqa: BLE001 - no replica reachable: an error body, not a crash
            return _from_exception(exc)
        return {"engines": [r if isinstance(r, dict) else {"error": f"{type(r).__name__}: {r}"[:300]}
                            for r in results]}


def build_app(model_path: str | Path, num_replicas: int = 2,
              request_router_config: RequestRouterConfig | dict | None = None,
              engine_options: dict | None = None, *, engine_env: dict | None = None,
              engine_actor_options: dict | None = None, ingress_options: dict | None = None,
              autoscaling_config: dict | None = None):
    """The Serve application: ``OpenAIIngress`` -> ``VLLMEngine`` x ``num_replicas``.

    ``request_router_config`` (a ``RequestRouterConfig`` or its dict) goes on the engine
    deployment, e.g. ``{"request_router_class": "router:CacheAwareRouter",
    "request_routing_stats_period_s": 2}``; ``None`` keeps Ray's default router.
    ``engine_options`` are ``EngineRunner`` keywords (``block_size``, ``max_model_len``,
    ``served_model_name``, ``engine_kwargs``, ...). ``engine_env`` is merged over
    ``DEFAULT_ENGINE_ENV`` into the engine replicas' environment; ``engine_actor_options``
    over ``{"num_cpus": 1}``; ``ingress_options`` are ``OpenAIIngress.options(...)``.
    ``autoscaling_config`` (Serve's fields, e.g. ``{"min_replicas": 1, "max_replicas": 3}``)
    replaces ``num_replicas`` on the engine deployment.
    """
    from engines.vllm_engine import VLLMEngineDeployment

    engine_options = dict(engine_options or {})
    model_path = str(Path(model_path).expanduser().absolute())
    model_name = engine_options.get("served_model_name") or Path(model_path).name
    actor_options: dict[str, Any] = {"num_cpus": 1, **(engine_actor_options or {})}
    runtime_env = dict(actor_options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**DEFAULT_ENGINE_ENV, **(runtime_env.get("env_vars") or {}), **(engine_env or {})}
    actor_options["runtime_env"] = runtime_env
    options: dict[str, Any] = {"ray_actor_options": actor_options}
    if autoscaling_config is not None:
        options["autoscaling_config"] = dict(autoscaling_config)
    else:
        options["num_replicas"] = num_replicas
    if request_router_config is not None:
        if isinstance(request_router_config, dict):
            request_router_config = RequestRouterConfig(**request_router_config)
        options["request_router_config"] = request_router_config
    engine = VLLMEngineDeployment.options(**options).bind(model_path, **engine_options)
    ingress = OpenAIIngress.options(**ingress_options) if ingress_options else OpenAIIngress
    return ingress.bind(engine, model_name, (model_path,))


def app_builder(args: dict) -> Any:
    """Serve application builder for YAML configs (``import_path:
    engines.openai_app:app_builder``). ``args``: ``model_path`` (default: the tiny local
    model, built if needed), ``num_replicas``, ``block_size``, ``max_model_len``. Routing is
    set per deployment in the YAML's ``deployments`` section (see
    examples/serve_cache_aware.yaml)."""
    from engines.tiny_model import build_tiny_model

    args = dict(args or {})
    model_path = args.pop("model_path", None) or build_tiny_model()
    engine_options = {k: args.pop(k) for k in ("block_size", "max_model_len") if k in args}
    return build_app(model_path, num_replicas=int(args.pop("num_replicas", 2)), engine_options=engine_options)
