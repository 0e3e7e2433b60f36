"""Tiny chat language models built on the spot: random weights, a tokenizer trained offline.

The tests that need a generating model fast build theirs with these functions
(``cachemesh demo`` serves a real one instead, converted from a GGUF: see
demo.py). Nothing is downloaded: the byte-level BPE tokenizer is trained with
the ``tokenizers`` library on a small corpus, and the Llama's weights are
random, so its text is gibberish; what it exercises is the path (origin,
cache, loader, worker, OpenAI API), not a model.

A model folder is what ``save_pretrained`` writes::

    tiny-chat/
      config.json              LlamaConfig
      generation_config.json   max_new_tokens, end-of-sequence token
      model.safetensors        the random weights
      tokenizer.json           the trained BPE
      tokenizer_config.json    special tokens and the chat template (or chat_template.jinja)
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

# A ChatML-like template: enough for apply_chat_template, and it refuses unknown roles.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|> {{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


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
