"""A tiny random-weight Llama and its tokenizer, built locally (nothing is downloaded).

The live tests and the example app serve this model with real vLLM on CPU: 2 layers,
hidden size 128, head_dim 64 (vLLM's CPU attention rejects 16), 32,768 positions (RoPE: a
long context costs nothing in weights, and lets live benchmarks send long histories),
512-token vocabulary from a byte-level BPE trained on a few built-in sentences (so any
text encodes), special tokens ``<pad>``/``<s>``/``</s>`` and ChatML's ``<|im_start|>`` /
``<|im_end|>`` around each message, as production chat templates have them (so a router
can tokenize a conversation message by message: see ``router.tokenization``). The
weights are seeded: two builds give the same tensors and the same tokenizer.

    path = build_tiny_model()               # ~/.cache/kvroute/tiny-llama, or $KVROUTE_TINY_MODEL
    python -m engines.tiny_model [PATH]     # the same from a shell; prints the path

A build writes into a temporary sibling directory and renames it into place, and the
directory counts as complete only when its ``kvroute-tiny-model.json`` marker names this
module's format version: a half-written directory is rebuilt, a complete one reused.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

#: Bumped whenever the built files change, so an old cache is rebuilt.
FORMAT_VERSION = 2
MARKER = "kvroute-tiny-model.json"
ENV_VAR = "KVROUTE_TINY_MODEL"
DEFAULT_DIR = Path("~/.cache/kvroute/tiny-llama")

VOCAB_SIZE = 512
MAX_POSITIONS = 32_768
SEED = 0
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")

#: ``<s>`` first, then ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message (ChatML),
#: and ``<|im_start|>assistant\n`` to prompt a reply.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=MAX_POSITIONS,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
    torch_dtype="float32",
)

_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A cache-aware router sends each request to the replica that already holds its prefix.",
    "Large language models keep the keys and values of recent prompts in a paged KV cache.",
    "You are a helpful assistant. Answer the user's question briefly and politely.",
    "Ray Serve runs deployments as replicas; a request router picks one replica per request.",
    "Prefix caching lets a repeated system prompt skip most of its prefill on the same replica.",
    "The weather today is sunny with a light breeze from the west and a few clouds.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024.",
    "user: hello there\nassistant: hi, how can I help you today?\n",
    "system: you are terse.\nuser: what is a token?\nassistant: a piece of text.\n",
    "Sessions keep a conversation on one replica while its load stays within bounds.",
    "def route(request, replicas): return min(replicas, key=lambda r: r.load)",
)


def default_path() -> Path:
    """``$KVROUTE_TINY_MODEL`` if set, else ``~/.cache/kvroute/tiny-llama``."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR).expanduser()


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a finished build of this format version."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def build_tiny_model(path: str | Path | None = None) -> Path:
    """Build the tiny Llama + tokenizer into ``path`` (default ``default_path()``) unless a
    complete build is already there; return the directory (absolute)."""
    target = (Path(path).expanduser() if path is not None else default_path()).absolute()
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        _write_tokenizer(tmp)
        _write_model(tmp)
        (tmp / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION, "seed": SEED,
                                              "config": MODEL_CONFIG}, indent=1, sort_keys=True))
        if target.exists():
            # An incomplete or outdated build (or a concurrent builder finished first).
            if is_complete(target):
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _training_text() -> list[str]:
    """The sentences plus deterministic recombinations of their words: enough distinct
    pairs for the BPE to learn all of its merges."""
    import random

    rng = random.Random(SEED)
    words = " ".join(_SENTENCES).split()
    lines = list(_SENTENCES)
    for _ in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(12)))
    return lines


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=MAX_POSITIONS, chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(out)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert fast.convert_tokens_to_ids(name) == i, (name, i)
    assert len(fast) <= VOCAB_SIZE, len(fast)


def _write_model(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**MODEL_CONFIG)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0] in ("-h", "--help")):
        print("usage: python -m engines.tiny_model [PATH]   (default: $KVROUTE_TINY_MODEL or "
              f"{DEFAULT_DIR})", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    print(build_tiny_model(argv[0] if argv else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
