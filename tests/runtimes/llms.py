"""Tiny language models built on the spot: random weights, a tokenizer trained offline.

Builders write ``save_pretrained`` directories (safetensors weights, tokenizer
files, a chat template unless asked not to); LoRA adapters are saved by PEFT
with random, non-zero weights so that each adapter changes the output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachemesh.demo_llm import CHAT_TEMPLATE
from cachemesh.demo_llm import tiny_llama as build_llama
from tests.convert.models import train_tokenizer


def tiny_llama(directory: Path, *, seed: int = 0, chat_template: bool = True,
               context: int = 4096) -> Path:
    # No end-of-sequence token: generations run to max_tokens (or a stop string), so
    # tests can count on their length.
    return build_llama(directory, train_tokenizer(), seed=seed, chat_template=chat_template,
                       context=context, eos=False)


def lora_adapter(base: Path, directory: Path, *, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base)  # building the fixture, not serving it
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(directory)
    cfg_file = directory / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = "org/tiny-base"  # on the Hub, not here: base= must say
    cfg_file.write_text(json.dumps(cfg))
    return directory


def tiny_bert(directory: Path, *, classifier: bool, seed: int = 0) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tokenizer = train_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"},
                        label2id={"neg": 0, "neutral": 1, "pos": 2})
    model = (BertForSequenceClassification if classifier else BertModel)(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@dataclass(frozen=True)
class TinyLLMs:
    chat: Path  # a Llama with a chat template
    plain: Path  # the same without one
    adapters: tuple[Path, Path]  # two LoRA adapters over `chat`
    embedder: Path  # a BERT encoder
    classifier: Path  # a BERT sequence classifier


@pytest.fixture(scope="session")
def tiny_llms(tmp_path_factory: pytest.TempPathFactory) -> TinyLLMs:
    """Every tiny language model the tests serve, built once per session."""
    root = tmp_path_factory.mktemp("llms")
    chat = tiny_llama(root / "chat")
    return TinyLLMs(
        chat=chat, plain=tiny_llama(root / "plain", seed=1, chat_template=False),
        adapters=(lora_adapter(chat, root / "lora-a", seed=1),
                  lora_adapter(chat, root / "lora-b", seed=2)),
        embedder=tiny_bert(root / "embedder", classifier=False),
        classifier=tiny_bert(root / "classifier", classifier=True))


def spelling_llama(directory: Path, messages: list[dict[str, str]], text: str) -> Path:
    """A Llama whose weights are set, not trained, so that its greedy answer to ``messages``
    is ``text``, token by token, then end-of-sequence.

    Every layer adds nothing to the residual stream (o_proj and down_proj are zero),
    embeddings are one-hot (hidden size = vocabulary size), and lm_head maps each token
    to the one that follows it in the answer: the prompt's last token to the answer's
    first, each answer token to the next, the last to ``</s>`` (every other token too).
    With the byte-level tokenizer trained on ASCII, a non-ASCII character in ``text``
    is two or more byte tokens: a stream must not tear it apart.
    """
    import torch

    tokenizer = train_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    last = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]
    answer = tokenizer(text, add_special_tokens=False)["input_ids"]
    chain = [last, *answer]
    if len(set(chain)) != len(chain):
        raise ValueError(f"the prompt's last token and {text!r} repeat a token: {chain}")
    build_llama(directory, tokenizer, hidden_size=len(tokenizer), intermediate_size=8,
                layers=1, context=256)
    from safetensors.torch import load_file, save_file

    weights = load_file(directory / "model.safetensors")
    vocab = len(tokenizer)
    successor = torch.full((vocab,), tokenizer.eos_token_id)
    successor[torch.tensor(chain)] = torch.tensor([*answer, tokenizer.eos_token_id])
    for name, tensor in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensor.zero_()
        elif name.endswith("norm.weight"):
            tensor.fill_(1.0)
    weights["model.embed_tokens.weight"] = torch.eye(vocab)
    lm_head = torch.zeros(vocab, vocab)
    lm_head[successor, torch.arange(vocab)] = 1.0
    weights["lm_head.weight"] = lm_head
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory
