"""Tiny, randomly initialised models built on the spot (no hub, no download).

Each builder writes a save_pretrained directory with safetensors weights and,
for language models, a byte-level BPE tokenizer trained offline with the
`tokenizers` library (``cachemesh.demo_llm``, shared with the demo), so that
CTranslate2's converter finds a vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from cachemesh import demo_llm

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a model cache pulls weights once and shares them",
    "convert checkpoints into fast inference formats",
    "tensor parallel shards split columns and rows",
] * 8
PROMPTS = ["the quick brown fox", "a model cache", "convert checkpoints into", "shards split"]


def train_tokenizer(vocab_size: int = 320, corpus: list[str] | None = None):
    return demo_llm.train_tokenizer(corpus or CORPUS, vocab_size)


def _save(model, tokenizer, directory: Path) -> Path:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def tiny_llama(directory: Path, *, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, initializer_range=0.2, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    return _save(model, tokenizer, directory), model, tokenizer


def tiny_gpt2(directory: Path, *, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = train_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    model = GPT2LMHeadModel(config).eval()
    return _save(model, tokenizer, directory), model, tokenizer


def tiny_bloom(directory: Path, *, seed: int = 0):
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    tokenizer = train_tokenizer()
    torch.manual_seed(seed)
    config = BloomConfig(vocab_size=len(tokenizer), hidden_size=64, n_layer=2, n_head=4,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    model = BloomForCausalLM(config).eval()
    return _save(model, tokenizer, directory), model, tokenizer


def tiny_bert(directory: Path, *, classifier: bool, seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = (BertForSequenceClassification if classifier else BertModel)(config).eval()
    return _save(model, None, directory), model


def digits_svm(directory: Path):
    import joblib
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    x, y = load_digits(return_X_y=True)
    model = SVC().fit(x[:400], y[:400])
    directory.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, directory / "model.joblib")
    return directory, model, x[400:440]
