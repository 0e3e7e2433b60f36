"""A tiny chat language model built on the spot: random weights, a tokenizer trained offline.

``cachemesh demo`` serves one over the OpenAI endpoints, and the tests build
theirs with the same functions. Nothing is downloaded: the byte-level BPE
tokenizer is trained with the ``tokenizers`` library on a small corpus (the
demo's is the docstrings of Python's own standard library, read from the
interpreter that runs it), and the Llama's weights are random, so its text is
gibberish. What it shows is the protocol and the path (origin, cache, loader,
worker, OpenAI API), not a model.

A model folder is what ``save_pretrained`` writes::

    tiny-chat/
      config.json              LlamaConfig
      generation_config.json   max_new_tokens, end-of-sequence token
      model.safetensors        the random weights (a few MB for the demo's)
      tokenizer.json           the trained BPE
      tokenizer_config.json    special tokens and the chat template (no chat_template.jinja)
      README.md                says that the weights are random
"""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEMO_LLM_NAME = "tiny-chat"

# A ChatML-like template: enough for apply_chat_template, and it refuses unknown roles.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|> {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

# Modules whose docstrings make the demo's corpus: always there, plain English.
_CORPUS_MODULES = ("builtins", "os", "os.path", "json", "pathlib", "collections", "functools",
                   "itertools", "textwrap", "shutil", "string", "re", "random", "statistics")


def python_corpus(max_lines: int = 600) -> list[str]:
    """Non-empty lines of the standard library's docstrings (the same on every run of a Python)."""
    lines: list[str] = []
    for module_name in _CORPUS_MODULES:
        module = importlib.import_module(module_name)
        objects = [module] + [getattr(module, n) for n in sorted(dir(module))
                              if not n.startswith("_")]
        for obj in objects:
            for line in (getattr(obj, "__doc__", None) or "").splitlines():
                line = line.strip()
                if len(line) > 8:
                    lines.append(line)
                    if len(lines) >= max_lines:
                        return lines
    return lines


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 320) -> Any:
    """A byte-level BPE trained on ``corpus``, as a fast transformers tokenizer (<unk> <s> </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_llama(directory: Path, tokenizer: Any, *, hidden_size: int = 32,
               intermediate_size: int = 64, layers: int = 2, context: int = 4096,
               seed: int = 0, chat_template: bool = True, eos: bool = True,
               max_new_tokens: int | None = None, template_file: bool = True) -> Path:
    """Save a randomly initialised Llama over ``tokenizer`` into ``directory``.

    ``eos=False`` leaves the model without an end-of-sequence token, so that its
    generations always run to ``max_tokens`` (tests count on their length).
    ``template_file=False`` writes the chat template into tokenizer_config.json,
    where tools older than transformers' ``chat_template.jinja`` look for it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    eos_id = tokenizer.eos_token_id if eos else None
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=context, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id, initializer_range=0.2, tie_word_embeddings=False,
    )
    if not eos:
        tokenizer.eos_token = None
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = eos_id
    if max_new_tokens is not None:
        model.generation_config.max_new_tokens = max_new_tokens
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory, save_jinja_files=template_file)
    return directory


def make_demo_llm(origin: Path) -> Path:
    """The demo's chat model in ``origin/tiny-chat``, built on first use (a few seconds).

    Built in a hidden folder beside it and renamed into place, so an interrupted
    build never leaves a half-written model where the demo looks for one.
    """
    model_dir = origin / DEMO_LLM_NAME
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Writing model shards" for a 3 MB file
    origin.mkdir(parents=True, exist_ok=True)
    building = origin / f".{DEMO_LLM_NAME}.building"
    shutil.rmtree(building, ignore_errors=True)
    tokenizer = train_tokenizer(python_corpus(), vocab_size=1000)
    tiny_llama(building, tokenizer, hidden_size=128, intermediate_size=256, layers=4,
               context=2048, max_new_tokens=32, template_file=False)
    (building / "README.md").write_text(
        "A tiny Llama with RANDOM weights (its text is gibberish) and a byte-level BPE\n"
        "tokenizer trained on Python's docstrings. It shows the serving path, not a model.\n")
    shutil.rmtree(model_dir, ignore_errors=True)  # a folder left without weights
    building.rename(model_dir)
    return model_dir
