"""Request content -> chained 64-bit block keys.

``key_i = xxh3_64(block_i bytes, seed=key_{i-1})`` with ``key_{-1}`` the namespace seed, over
full blocks only (a trailing partial block gets no key, as in vLLM's prefix cache). So two
requests share key ``i`` exactly when their first ``i + 1`` blocks are identical *and* they
are in the same namespace; a key alone identifies a whole prefix, which is what lets the
prefix tree be a flat map.

The namespace (model id, LoRA adapter, ``cache_salt``) is mixed into the first seed, so two
adapters or two salts never share a key: a tenant's cached prefix can neither attract nor
reveal another tenant's traffic.

Three keyers share one interface (``Keyer``):
  TokenBlockKeyer   token ids in blocks of ``block_size`` tokens (default 16, vLLM's default)
  CharChunkKeyer    approximate mode without a tokenizer: fixed chunks of the prompt text
  PrehashedKeyer    block ids already computed upstream (e.g. Mooncake traces' ``hash_ids``)
Keying is O(prompt length); each keyer is immutable and safe to share.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from array import array
from collections.abc import Sequence
from functools import lru_cache

import xxhash

from router._fast import speedups
from router.errors import ConfigError

_xxh3 = xxhash.xxh3_64_intdigest
_U64 = (1 << 64) - 1


def _encode_part(part: str) -> bytes:
    data = part.encode("utf-8", "surrogatepass")
    return len(data).to_bytes(4, "little") + data


@lru_cache(maxsize=4096)
def namespace_seed(model: str = "", lora: str = "", cache_salt: str = "") -> int:
    """The first seed of a key chain for this (model, LoRA adapter, cache salt).

    Each part is length-prefixed, so ("ab", "c") and ("a", "bc") differ. Cached (bounded).
    """
    for field, value in (("model", model), ("lora", lora), ("cache_salt", cache_salt)):
        if not isinstance(value, str):
            raise TypeError(f"namespace {field} must be a string, got {type(value).__name__}")
    return _xxh3(b"kvroute-ns-v1" + _encode_part(model) + _encode_part(lora) + _encode_part(cache_salt))


DEFAULT_SEED = namespace_seed()


class Keyer(ABC):
    """Turns one request's prompt into block keys. ``block_tokens`` is tokens per key."""

    block_tokens: int

    @abstractmethod
    def keys(self, content, seed: int = DEFAULT_SEED) -> list[int]:
        """Chained keys of the full blocks of ``content``."""

    @abstractmethod
    def prompt_tokens(self, content) -> int:
        """Prompt length in tokens (an estimate in approximate mode)."""


def _chain_py(data: bytes | str, step: int, seed: int) -> list[int]:
    """Chained keys of each full ``step``-byte block of ``data`` (a str: of its UTF-8
    encoding, lone surrogates kept); O(len(data)). The reference for the C ``chain``,
    which returns the same keys about 8x faster (and keys an ASCII str in place)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    out: list[int] = []
    append = out.append
    prev = seed
    for start in range(0, len(data) - step + 1, step):
        prev = _xxh3(data[start:start + step], prev)
        append(prev)
    return out


_chain = speedups.chain if speedups is not None else _chain_py


def _chain_on_py(keys: list[int], count: int, head: bytes, start: int, end: int, tail: bytes,
                 step: int) -> list[int]:
    """The reference for the C ``chain_on``: ``keys[:count]``, then the chain from
    ``keys[count - 1]`` over the full blocks of ``head[start:end] + tail``."""
    if not 1 <= count <= len(keys) or step <= 0 or not 0 <= start <= end <= len(head):
        raise ValueError("chain_on: need 1 <= count <= len(keys), step > 0 and 0 <= start <= end <= len(head)")
    out = keys[:count]
    out += _chain(bytes(memoryview(head)[start:end]) + bytes(tail), step, keys[count - 1])
    return out


_chain_on = getattr(speedups, "chain_on", None) or _chain_on_py


class TokenBlockKeyer(Keyer):
    """Keys of token-id blocks of ``block_size`` tokens (ids as little-endian uint32)."""

    def __init__(self, block_size: int = 16) -> None:
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise ConfigError("keys.block_size", f"must be a positive integer, got {block_size!r}")
        self.block_tokens = block_size
        self._step = 4 * block_size

    def _pack(self, token_ids: Sequence[int]) -> bytes:
        try:
            packed = array("I", token_ids)
        except (OverflowError, TypeError) as exc:
            raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None
        if packed.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte "I"
            packed = array("L", token_ids)
        return packed.tobytes()

    def keys(self, content: Sequence[int], seed: int = DEFAULT_SEED) -> list[int]:
        return _chain(self._pack(content), self._step, seed)

    def keys_packed(self, data: bytes, seed: int = DEFAULT_SEED) -> list[int]:
        """``keys`` of token ids already packed as little-endian uint32 (what
        ``router.tokenization`` produces): no list of ints in between."""
        return _chain(data, self._step, seed)

    def keys_on(self, keys: list[int], count: int, head: bytes, start: int, end: int,
                tail: bytes = b"") -> list[int]:
        """A new list: ``keys[:count]`` (a chain's first keys) followed by the keys of the
        packed ids ``head[start:end] + tail`` chained on from ``keys[count - 1]``, without
        joining the two byte strings (a resumed conversation: its remembered keys, then
        the blocks after them). O(count + new blocks)."""
        return _chain_on(keys, count, head, start, end, tail, self._step)

    def prompt_tokens(self, content: Sequence[int]) -> int:
        return len(content)

    def __repr__(self) -> str:
        return f"TokenBlockKeyer(block_size={self.block_tokens})"


class CharChunkKeyer(Keyer):
    """Approximate mode: keys of fixed chunks of the prompt's UTF-8 encoding.

    A chunk is ``chunk_chars`` bytes of UTF-8, which is ``chunk_chars`` characters of ASCII
    text (fewer characters where the text is multi-byte); slicing the encoded bytes rather
    than the string costs a third less. Lone surrogates (from undecodable input) are kept
    as their own bytes, so invalid text still keys deterministically instead of failing.
    Tokens are estimated as characters / ``chars_per_token``. The default 128-character
    chunk is about 32 tokens at 4 characters per token: the smallest block vLLM's CPU
    build accepts, two of vLLM's default 16-token GPU blocks. A finer chunk locates the
    end of a shared prefix more precisely, at a cost linear in the number of chunks (the
    router benchmark reports both 64 and 128).
    """

    def __init__(self, chunk_chars: int = 128, chars_per_token: float = 4.0) -> None:
        if not isinstance(chunk_chars, int) or isinstance(chunk_chars, bool) or chunk_chars <= 0:
            raise ConfigError("keys.chunk_chars", f"must be a positive integer, got {chunk_chars!r}")
        if not isinstance(chars_per_token, (int, float)) or not chars_per_token > 0:
            raise ConfigError("keys.chars_per_token", f"must be a number > 0, got {chars_per_token!r}")
        self.chunk_chars = chunk_chars
        self.chars_per_token = float(chars_per_token)
        self.block_tokens = max(1, round(chunk_chars / chars_per_token))

    @staticmethod
    def _text(content: str | bytes) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, (bytes, bytearray, memoryview)):
            return bytes(content).decode("utf-8", "surrogateescape")
        raise TypeError(f"prompt must be str or bytes, got {type(content).__name__}")

    def keys(self, content: str | bytes, seed: int = DEFAULT_SEED) -> list[int]:
        if type(content) is not str:
            content = self._text(content)
        return _chain(content, self.chunk_chars, seed)  # keys the str's UTF-8 bytes

    def prompt_tokens(self, content: str | bytes) -> int:
        if type(content) is not str:
            content = self._text(content)
        return math.ceil(len(content) / self.chars_per_token)

    def __repr__(self) -> str:
        return f"CharChunkKeyer(chunk_chars={self.chunk_chars}, chars_per_token={self.chars_per_token})"


class PrehashedKeyer(Keyer):
    """Keys of block ids computed upstream (Mooncake ``hash_ids``: one id per 512 tokens).

    The ids are re-chained (``xxh3_64(id as 8 bytes, seed=previous key)``) so the namespace
    still separates tenants and a key still names a whole prefix even if the upstream ids
    were not chained. The prompt length is not derivable from ids: callers pass it.
    """

    def __init__(self, block_tokens: int = 512) -> None:
        if not isinstance(block_tokens, int) or isinstance(block_tokens, bool) or block_tokens <= 0:
            raise ConfigError("keys.block_tokens", f"must be a positive integer, got {block_tokens!r}")
        self.block_tokens = block_tokens

    def keys(self, content: Sequence[int], seed: int = DEFAULT_SEED) -> list[int]:
        out: list[int] = []
        append = out.append
        prev = seed
        for block_id in content:
            if not isinstance(block_id, int) or isinstance(block_id, bool):
                raise ValueError(f"block ids must be integers, got {block_id!r}")
            prev = _xxh3((block_id & _U64).to_bytes(8, "little"), prev)
            append(prev)
        return out

    def prompt_tokens(self, content: Sequence[int]) -> int:
        return len(content) * self.block_tokens

    def __repr__(self) -> str:
        return f"PrehashedKeyer(block_tokens={self.block_tokens})"


def make_keyer(kind: str = "chars", **options) -> Keyer:
    """Build a keyer by name: ``tokens`` (block_size), ``chars`` (chunk_chars,
    chars_per_token) or ``prehashed`` (block_tokens)."""
    kinds = {"tokens": TokenBlockKeyer, "chars": CharChunkKeyer, "prehashed": PrehashedKeyer}
    try:
        cls = kinds[kind]
    except KeyError:
        raise ConfigError("keys.kind", f"unknown keyer {kind!r}; valid: {sorted(kinds)}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError("keys", f"bad option for the {kind!r} keyer: {exc}") from None
