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
