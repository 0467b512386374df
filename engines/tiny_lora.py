"""Random-weight LoRA adapters for the tiny Llama (``engines.tiny_model``), built locally,
and the ``ray.serve.llm`` wiring that serves them from a local directory.

    path = build_tiny_lora("adapter-a")        # ~/.cache/kvroute/tiny-lora/adapter-a
    root = path.parent                         # one subfolder per adapter
    config = build_lora_llm_config(root, request_router_config=...)   # engines.ray_llm's, LoRA on
    serve.run(build_openai_app(config))        # then ask for model "tiny-llama:adapter-a"
    python -m engines.tiny_lora NAME...        # build from a shell; prints the paths

An adapter is in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``,
tensors ``base_model.model.model.layers.{i}.{self_attn,mlp}.{proj}.lora_{A,B}.weight``) on
all seven projections of both layers. Its weights are seeded (default: from the name), and
unlike a freshly initialised PEFT adapter (B = 0, a no-op) both A and B are random, scaled
so that the low-rank update is about as large as the base projection: each adapter changes
the model's greedy answers, and two adapters answer differently. A build is cached like the
model's: written into a temporary sibling, renamed into place, and complete only when its
``kvroute-tiny-lora.json`` marker names this module's format version, rank and seed.

Serving from a local directory. Ray Serve LLM loads an adapter on a replica on the first
request for it (``serve.multiplexed``: ``LLMServer._load_model`` then vLLM's
``load_lora_adapter``), fetching it from ``LoraConfig.dynamic_lora_loading_path``, which
Ray 2.60 accepts only as ``s3://``, ``gs://``, ``abfss://`` or ``azure://`` (its validator,
and ``CloudFileSystem``, reject local paths and ``file://``). ``build_lora_llm_config``
therefore leaves that path unset and serves with ``LocalLoraLLMServer``, the project's
``KVRouteLLMServer`` whose multiplex loader (``LocalLoraModelLoader``) maps the adapter id
``<base>:<name>`` to ``<root>/<name>`` (``root`` travels in
``experimental_configs["kvroute_lora_root"]``) instead of downloading. Everything else is
Ray's path: the ingress turns ``"model": "tiny-llama:adapter-a"`` into the handle's
``multiplexed_model_id``, Serve's routers prefer replicas that have the adapter loaded, and
the replica hands the adapter to vLLM under the full id. Ray's ``/v1/models`` listing of
adapters reads the same cloud path and so does not list local adapters.

``LocalLoraLLMServer`` also keeps a small log of what it served (``kvroute_lora_report``):
which adapters vLLM holds, and per request its adapter, its OpenAI ``user`` field and
whether the adapter was already loaded here when it arrived (Serve's multiplexing rule made
observable). Importing this module imports neither Ray nor torch; the two classes are
built on first access.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from engines.tiny_model import MODEL_CONFIG, build_tiny_model

#: Bumped whenever the built files change, so an old cache is rebuilt.
FORMAT_VERSION = 1
MARKER = "kvroute-tiny-lora.json"
ENV_VAR = "KVROUTE_TINY_LORA_ROOT"
DEFAULT_ROOT = Path("~/.cache/kvroute/tiny-lora")
#: The experimental_configs key that tells ``LocalLoraModelLoader`` where adapters live.
ROOT_KEY = "kvroute_lora_root"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: How many served requests a replica's log keeps (oldest dropped).
LOG_LIMIT = 1000


def default_root() -> Path:
    """``$KVROUTE_TINY_LORA_ROOT`` if set, else ``~/.cache/kvroute/tiny-lora``."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_ROOT).expanduser()


def name_seed(name: str) -> int:
    """A stable 31-bit seed from an adapter's name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") & 0x7FFFFFFF


def _projection_shapes() -> dict[str, tuple[str, int, int]]:
    """Projection -> (parent module, in features, out features) of the tiny Llama."""
    hidden, inter = MODEL_CONFIG["hidden_size"], MODEL_CONFIG["intermediate_size"]
    head_dim = hidden // MODEL_CONFIG["num_attention_heads"]
    kv = MODEL_CONFIG["num_key_value_heads"] * head_dim
    return {"q_proj": ("self_attn", hidden, hidden), "k_proj": ("self_attn", hidden, kv),
            "v_proj": ("self_attn", hidden, kv), "o_proj": ("self_attn", hidden, hidden),
            "gate_proj": ("mlp", hidden, inter), "up_proj": ("mlp", hidden, inter),
            "down_proj": ("mlp", inter, hidden)}


def _expected_marker(name: str, rank: int, seed: int) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "name": name, "rank": rank, "seed": seed,
            "target_modules": list(TARGET_MODULES), "base_config": MODEL_CONFIG}


def is_complete(path: str | Path, *, name: str, rank: int, seed: int) -> bool:
    """Whether ``path`` holds a finished build of this adapter (format, rank and seed)."""
    try:
        return json.loads((Path(path) / MARKER).read_text()) == json.loads(
            json.dumps(_expected_marker(name, rank, seed)))
    except (OSError, ValueError):
        return False


def build_tiny_lora(name: str, *, model_path: str | Path | None = None, rank: int = 8, seed: int | None = None,
                    root: str | Path | None = None) -> Path:
    """Build the random LoRA adapter ``name`` for the tiny model into ``root/name`` (default
    root ``default_root()``) unless a complete build with this rank and seed is there;
    return the directory (absolute). ``seed`` defaults to ``name_seed(name)``, so distinct
    names give distinct adapters. ``model_path`` (the base model, built if needed) is only
    recorded as ``base_model_name_or_path``. ``name`` must be a plain directory name."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or ":" in name:
        raise ValueError(f"adapter name must be a plain directory name without ':', got {name!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    seed = name_seed(name) if seed is None else int(seed)
    base = (Path(root).expanduser() if root is not None else default_root()).absolute()
    target = base / name
    if is_complete(target, name=name, rank=rank, seed=seed):
        return target
    model = build_tiny_model(model_path)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=base))
    tmp.chmod(0o755)
    try:
        _write_adapter(tmp, rank=rank, seed=seed, base_model=str(model))
        (tmp / MARKER).write_text(json.dumps(_expected_marker(name, rank, seed), indent=1, sort_keys=True))
        if target.exists():
            if is_complete(target, name=name, rank=rank, seed=seed):
                return target  # a concurrent builder finished first
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_loras(names, **options: Any) -> dict[str, Path]:
    """``build_tiny_lora`` for each name (same options); name -> directory. All land in
    one root, the directory to serve them from."""
    return {name: build_tiny_lora(name, **options) for name in names}


def _write_adapter(out: Path, *, rank: int, seed: int, base_model: str) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    alpha = 2 * rank  # scaling alpha / r = 2
    tensors = {}
    for layer in range(MODEL_CONFIG["num_hidden_layers"]):
        for proj, (parent, fan_in, fan_out) in _projection_shapes().items():
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
            # A x has unit-scale entries for unit-scale x; B's 0.05 and the scaling of 2
            # make the update (B A x) about 0.1 * sqrt(r) per output: larger than the base
            # projection's (initializer_range 0.02 * sqrt(fan_in)), so answers change.
            a = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5
            b = torch.randn(fan_out, rank, generator=gen) * 0.05
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": list(TARGET_MODULES),
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "inference_mode": True, "init_lora_weights": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))


# -- ray.serve.llm wiring ----------------------------------------------------------------------
def build_lora_llm_config(lora_root: str | Path, *, max_lora_rank: int = 8, max_loras: int = 4,
                          max_adapters_per_replica: int = 4, engine_kwargs: dict | None = None,
                          **options: Any):
    """``engines.ray_llm.build_llm_config(**options)`` with LoRA on: vLLM's
    ``enable_lora`` (``max_lora_rank``, ``max_loras`` adapters in one batch) and
    ``enable_prompt_tokens_details`` (each answer's ``usage.prompt_tokens_details.
    cached_tokens`` is vLLM's count of prefix-cache hit tokens), Ray's ``lora_config``
    (``max_num_adapters_per_replica``: Serve's multiplexing bound) and
    ``LocalLoraLLMServer`` reading adapters from ``lora_root/<name>``."""
    from ray.serve.llm import LoraConfig

    from engines.ray_llm import build_llm_config

    root = Path(lora_root).expanduser().absolute()
    if not root.is_dir():
        raise ValueError(f"lora_root: not a directory: {root}")
    kwargs = {"enable_lora": True, "max_lora_rank": max_lora_rank, "max_loras": max_loras,
              "max_cpu_loras": max(max_loras, max_adapters_per_replica), "enable_prompt_tokens_details": True,
              **(engine_kwargs or {})}
    options.setdefault("server_cls", _server_class())
    config = build_llm_config(engine_kwargs=kwargs, **options)
    # Assigned after construction: LLMConfig validates lora_config on construction only,
    # and its dynamic_lora_loading_path (cloud only) is deliberately left unset.
    config.lora_config = LoraConfig(max_num_adapters_per_replica=max_adapters_per_replica)
    config.experimental_configs = {**config.experimental_configs, ROOT_KEY: str(root)}
    return config


def _loader_class():
    """``LocalLoraModelLoader``: Ray's ``LoraModelLoader`` that finds ``<base>:<name>`` at
    ``<root>/<name>`` on local disk instead of syncing it from cloud storage."""
    cached = globals().get("LocalLoraModelLoader")
    if cached is not None:
        return cached
    from ray.llm._internal.common.models import global_id_manager
    from ray.llm._internal.common.utils.lora_utils import get_lora_id
    from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
    from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader

    class LocalLoraModelLoader(LoraModelLoader):
        async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
            if lora_model_id in self.disk_cache:
                return self.disk_cache[lora_model_id]
            root = (llm_config.experimental_configs or {}).get(ROOT_KEY)
            if not root:
                raise ValueError(f"LocalLoraModelLoader: experimental_configs[{ROOT_KEY!r}] is not set")
            name = get_lora_id(lora_model_id)
            path = Path(root) / name
            if not name or "/" in name or not (path / "adapter_config.json").is_file():
                # Serve answers the request with this error (Ray's own loader raises too).
                raise ValueError(f"LoRA adapter {lora_model_id!r}: no adapter_config.json under {path}")
            config = DiskMultiplexConfig.model_validate({
                "model_id": lora_model_id, "max_total_tokens": None, "local_path": str(path),
                "lora_assigned_int_id": global_id_manager.next()})
            self.disk_cache[lora_model_id] = config
            return config

    LocalLoraModelLoader.__module__ = __name__
    LocalLoraModelLoader.__qualname__ = "LocalLoraModelLoader"
    globals()["LocalLoraModelLoader"] = LocalLoraModelLoader
    return LocalLoraModelLoader


def _server_class():
    """``LocalLoraLLMServer``: ``KVRouteLLMServer`` with the local adapter loader and a log
    of what it served (``kvroute_lora_report``)."""
    cached = globals().get("LocalLoraLLMServer")
    if cached is not None:
        return cached
    from ray import serve

    from engines.ray_llm import KVRouteLLMServer

    class LocalLoraLLMServer(KVRouteLLMServer):
        def _init_multiplex_loader(self, model_downloader_cls=None):
            self._kvroute_lora_log = deque(maxlen=LOG_LIMIT)
            super()._init_multiplex_loader(model_downloader_cls or _loader_class())

        def _kvroute_loaded(self) -> list[str]:
            models = getattr(self.engine, "_oai_models", None)
            return sorted(getattr(models, "lora_requests", None) or {})

        def _kvroute_note(self, request: Any) -> None:
            adapter = serve.get_multiplexed_model_id() or ""
            self._kvroute_lora_log.append({
                "adapter": adapter, "user": getattr(request, "user", None),
                "loaded_before": bool(adapter) and adapter in self._kvroute_loaded()})

        async def chat(self, request, raw_request_info=None, kvroute_prompt=None):
            self._kvroute_note(request)
            return await super().chat(request, raw_request_info, kvroute_prompt)

        async def completions(self, request, raw_request_info=None, kvroute_prompt=None):
            self._kvroute_note(request)
            return await super().completions(request, raw_request_info, kvroute_prompt)

        async def kvroute_lora_report(self) -> dict[str, Any]:
            """This replica's id, the adapters vLLM holds, and the served-request log
            (oldest first): ``adapter`` (the multiplexed model id, "" for the base model),
            ``user`` and ``loaded_before``."""
            context = serve.get_replica_context()
            return {"replica": context.replica_id.unique_id if context else None,
                    "loaded": self._kvroute_loaded(), "log": list(self._kvroute_lora_log)}

    LocalLoraLLMServer.__module__ = __name__
    LocalLoraLLMServer.__qualname__ = "LocalLoraLLMServer"
    globals()["LocalLoraLLMServer"] = LocalLoraLLMServer
    return LocalLoraLLMServer


def __getattr__(name: str):
    # Built on first access, so that importing this module needs neither Ray nor torch,
    # while pickling (by reference) finds the classes here.
    if name == "LocalLoraLLMServer":
        return _server_class()
    if name == "LocalLoraModelLoader":
        return _loader_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m engines.tiny_lora NAME...   (into $KVROUTE_TINY_LORA_ROOT or "
              f"{DEFAULT_ROOT})", file=sys.stderr)
        return 0 if argv else 2
    for path in build_tiny_loras(argv).values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
