"""Realistic tokenizers built locally (nothing is downloaded): a byte-level BPE of 32,768
tokens trained with the ``tokenizers`` library on generated English-like text and code,
with the pre-tokenizer regex, special tokens and chat templates of two model families.

The tiny model's 512-token vocabulary is far smaller than a production model's, so it
tokenizes several times slower per character and its pieces are shorter; these stand in
for a production tokenizer where a benchmark or a property test needs one:

    path = build_bench_tokenizer("llama3")   # ~/.cache/kvroute/bench-tokenizer-llama3
    path = build_bench_tokenizer("chatml")   # Qwen/ChatML style

* ``llama3``: ``<|begin_of_text|>`` (added by the template and, for plain text, by the
  post-processor), ``<|start_header_id|>role<|end_header_id|>\\n\\n`` headers, contents
  trimmed, ``<|eot_id|>`` after each message (Llama 3's template, tools left out).
* ``chatml``: ``<|im_start|>role\\n...<|im_end|>\\n`` (Qwen 2.5's template, tools left out),
  a default system message when the conversation has none, no BOS.

Both use Llama 3's pre-tokenizer regex (digits in groups of three, contractions, a
leading space kept with its word). The training text is generated from a fixed seed, so
two builds give the same files. Built into a temporary sibling directory and renamed into
place, as ``engines.tiny_model`` does; about 10 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

FORMAT_VERSION = 1
MARKER = "kvroute-bench-tokenizer.json"
DEFAULT_ROOT = Path("~/.cache/kvroute")
VOCAB_SIZE = 32_768
SEED = 0

#: Llama 3's pre-tokenizer split (tiktoken's cl100k pattern).
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
    "+ '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

STYLES = {
    "llama3": dict(template=LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>",
                   specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>", "<|python_tag|>"), add_bos=True),
    "chatml": dict(template=CHATML_TEMPLATE, bos=None, eos="<|im_end|>",
                   specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), add_bos=False),
}


def default_path(style: str) -> Path:
    return (DEFAULT_ROOT / f"bench-tokenizer-{style}").expanduser()


def _is_complete(path: Path) -> bool:
    try:
        return json.loads((path / MARKER).read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def build_bench_tokenizer(style: str = "llama3", path: str | Path | None = None) -> Path:
    """Build the ``style`` tokenizer into ``path`` (default ``default_path(style)``) unless a
    complete build is there; return the directory (absolute)."""
    if style not in STYLES:
        raise ValueError(f"style: one of {sorted(STYLES)}, got {style!r}")
    target = (Path(path).expanduser() if path is not None else default_path(style)).absolute()
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        _write(tmp, style)
        (tmp / MARKER).write_text(json.dumps({"format_version": FORMAT_VERSION, "style": style,
                                              "vocab_size": VOCAB_SIZE, "seed": SEED}))
        if target.exists():
            if _is_complete(target):
                return target
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- generated training text ----------------------------------------------------------------
_SYLLABLES = ("ka", "to", "ri", "men", "sa", "lo", "pe", "dri", "qua", "ven", "ther", "ing", "ble", "ment", "con",
              "pro", "ex", "al", "um", "zo", "fi", "gra", "nu", "tis", "or", "an", "es", "ly")
_COMMON = ("the of and a to in is you that it he for was on are as with his they at be this from I have or by one "
           "had not but what all were when we there can an your which their said if do will each about how up out "
           "them then she many some so these would other into has more her two like him see time could no make "
           "than first been its who now people my made over did down only way find use may water long little very "
           "after words called just where most know").split()


class TextGenerator:
    """Deterministic English-like prose, code and numbers (for training and for workloads)."""

    def __init__(self, seed: int = SEED, lexicon: int = 30_000) -> None:
        self.rng = random.Random(seed)
        rng = random.Random(seed + 1)
        self.words = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4)))
                             for _ in range(lexicon)})

    def word(self) -> str:
        rng = self.rng
        if rng.random() < 0.45:
            return rng.choice(_COMMON)
        # Zipf-like: a few invented words are frequent, most are rare.
        return self.words[min(len(self.words) - 1, int(rng.paretovariate(1.1) * 7)) if rng.random() < 0.5
                          else rng.randrange(len(self.words))]

    def sentence(self) -> str:
        rng = self.rng
        text = " ".join(self.word() for _ in range(rng.randint(6, 20)))
        return text[0].upper() + text[1:] + rng.choice((".", ".", ".", "?", "!", ":", ";"))

    def code(self) -> str:
        rng = self.rng
        name = self.word()
        return (f"def {name}_{rng.randint(0, 99)}(x, y={rng.randint(0, 9)}):\n"
                f"    return [{name}(i) for i in range(x) if i % {rng.randint(2, 9)} == 0]\n")

    def paragraph(self) -> str:
        rng = self.rng
        if rng.random() < 0.15:
            return self.code()
        if rng.random() < 0.05:
            return ", ".join(str(rng.randint(0, 10**rng.randint(1, 7))) for _ in range(rng.randint(3, 12))) + "."
        return " ".join(self.sentence() for _ in range(rng.randint(2, 8)))

    def text(self, chars: int) -> str:
        """About ``chars`` characters of paragraphs separated by blank lines."""
        parts: list[str] = []
        total = 0
        while total < chars:
            parts.append(self.paragraph())
            total += len(parts[-1]) + 2
        return "\n\n".join(parts)


def _write(out: Path, style: str) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    spec = STYLES[style]
    gen = TextGenerator(SEED)
    corpus = [gen.paragraph() for _ in range(40_000)]
    # Chat scaffolding, so roles and the default system prompt are whole tokens, as in a
    # production vocabulary.
    corpus += ["system\nYou are a helpful assistant.\nuser\nassistant\ntool\n"] * 200
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(spec["specials"]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, bos_id)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=spec["eos"],
                                   model_max_length=131_072, chat_template=spec["template"])
    fast.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STYLES or len(argv) > 2:
        print(f"usage: python -m engines.bench_tokenizer {{{','.join(STYLES)}}} [PATH]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    print(build_bench_tokenizer(argv[0], argv[1] if len(argv) > 1 else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
