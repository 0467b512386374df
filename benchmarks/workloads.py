"""Seeded synthetic prompt streams for benchmarks."""

from __future__ import annotations

import random

_WORDS = ("the of and to in is you that it he was for on are as with his they at be this from "
          "have or by one had not but what all were when we there can an your which their said if "
          "do will each about how up out them then she many some so these would other into has more "
          "her two like him see time could no make than first been its who now people my made over "
          "did down only way find use may water long little very after words called just where most "
          "know get through back much before go good new write our used me man too any day same right "
          "look think also around another came come work three word must because does part even place "
          "well such here take why things help put years different away again off went old number").split()


def _text(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:chars]


def shared_prefix_prompts(count: int, *, seed: int = 0, system_prompts: int = 64,
                          prompt_chars: int = 5000, system_chars: tuple[int, int] = (1500, 3500),
                          zipf_s: float = 1.1) -> list[str]:
    """``count`` prompts of about ``prompt_chars`` characters: one of ``system_prompts``
    shared system prompts (Zipf popularity) followed by a unique suffix."""
    rng = random.Random(seed)
    systems = [_text(rng, rng.randint(*system_chars)) + "\n" for _ in range(system_prompts)]
    weights = [1.0 / (rank + 1) ** zipf_s for rank in range(system_prompts)]
    prompts = []
    for i in range(count):
        system = rng.choices(systems, weights)[0]
        suffix = f"[request {i}] " + _text(rng, max(0, prompt_chars - len(system) - 20))
        prompts.append(system + suffix)
    return prompts
