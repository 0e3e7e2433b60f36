"""A GGUF file's tokenizer, rebuilt as a Hugging Face ``tokenizers`` tokenizer.

GGUF keeps the vocabulary in its metadata::

    tokenizer.ggml.model        "gpt2": byte-level BPE (the one rebuilt here);
                                "llama": SentencePiece (refused, see below)
    tokenizer.ggml.pre          how llama.cpp splits text before BPE: "smollm",
                                "llama-bpe", "qwen2", "default", …
    tokenizer.ggml.tokens       token strings by id, byte-level ("Ġthe" is " the")
    tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges       "left right" pairs, the first merged first
    tokenizer.ggml.*_token_id   bos, eos, unknown, padding, eot (end of turn)
    tokenizer.ggml.add_bos_token, add_eos_token
    tokenizer.chat_template     the Jinja chat template, as tokenizer_config.json keeps it

Control tokens (``<|im_start|>``) become special added tokens, user-defined
ones plain added tokens, so that the chat template's markers are never split.
The pre-tokenizer follows ``tokenizer.ggml.pre``: each name llama.cpp uses
maps to the split its source tokenizer made (``PRE_TOKENIZERS``); an unknown
name is refused rather than tokenized differently from the original.

SentencePiece GGUFs (Llama 2, Mistral, TinyLlama) keep scores instead of
merges; rebuilding those is not done yet, and they are refused with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInputError
from .gguf_file import GGUFFile

CONTROL, USER_DEFINED = 3, 4
# Llama 3's and Qwen2's split (their tokenizer.json's Split pattern): contractions, words
# with one leading non-letter, numbers (1 to 3 digits; Qwen2: one), punctuation, newlines.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> how the text is split before BPE:
#   "bytelevel": GPT-2's own split (ByteLevel with its regex)
#   "digits+bytelevel": every digit alone, then GPT-2's split (SmolLM, StarCoder)
#   ("split", pattern, nfc): a regex split, then bytes only; nfc: NFC-normalize first
PRE_TOKENIZERS: dict[str, Any] = {
    "default": "bytelevel",
    "gpt2": "bytelevel",
    "gpt-2": "bytelevel",
    "smollm": "digits+bytelevel",
    "llama-bpe": ("split", _LLAMA3_SPLIT, False),
    "llama3": ("split", _LLAMA3_SPLIT, False),
    "qwen2": ("split", _QWEN2_SPLIT, True),
}


@dataclass
class GGUFTokenizer:
    """What :func:`read_tokenizer` rebuilt: the tokenizer and the files' other fields."""

    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int | None
    eos_ids: list[int]  # eos first, then end-of-turn tokens
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    warnings: list[str] = field(default_factory=list)

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokenizer.id_to_token(token_id)

    def tokenizer_config(self, context_length: int | None) -> dict[str, Any]:
        """tokenizer_config.json: the special tokens, the BOS/EOS rules, the chat template."""
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
        }
        for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_ids[0]
                              if self.eos_ids else None), ("unk_token", self.unk_id),
                              ("pad_token", self.pad_id)):
            if token_id is not None:
                config[key] = self.token(token_id)
        if context_length:
            config["model_max_length"] = context_length
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return config

    def generation_config(self) -> dict[str, Any]:
        """generation_config.json: which tokens start a sequence and which end it."""
        config: dict[str, Any] = {}
        if self.bos_id is not None:
            config["bos_token_id"] = self.bos_id
        if self.eos_ids:
            config["eos_token_id"] = self.eos_ids[0] if len(self.eos_ids) == 1 else self.eos_ids
        if self.pad_id is not None:
            config["pad_token_id"] = self.pad_id
        return config


def check_tokenizer(gguf: GGUFFile) -> None:
    """Refuse, cheaply, a tokenizer :func:`read_tokenizer` cannot rebuild."""
    model = gguf.get("tokenizer.ggml.model")
    if model is None:
        raise InvalidInputError(f"{gguf.path} has no tokenizer (no tokenizer.ggml.model)")
    if model != "gpt2":
        raise InvalidInputError(
            f"{gguf.path}: tokenizer.ggml.model is {model!r}; cachemesh rebuilds byte-level BPE"
            " tokenizers ('gpt2') only, not SentencePiece ('llama') or others yet")
    pre = str(gguf.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise InvalidInputError(
            f"{gguf.path}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer cachemesh knows"
            f" (it knows: {', '.join(sorted(PRE_TOKENIZERS))})")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        if not gguf.has(key):
            raise InvalidInputError(f"{gguf.path}: the GGUF metadata has no {key}")
    n = gguf.count("tokenizer.ggml.tokens")
    types = gguf.count("tokenizer.ggml.token_type")
    if gguf.has("tokenizer.ggml.token_type") and types != n:
        raise InvalidInputError(f"{gguf.path}: {n} tokens but {types} token types")
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "padding_token_id",
                "unknown_token_id"):
        _token_id(gguf, key, n)


def _pre_tokenizer(kind: Any) -> tuple[Any, Any]:
    """(normalizer or None, pre-tokenizer) for a PRE_TOKENIZERS entry."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if kind == "bytelevel":
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits+bytelevel":
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    _, pattern, nfc = kind
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    return (normalizers.NFC() if nfc else None), pre_tokenizers.Sequence([
        split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _post_processor(tokens: list[str], bos: int | None, eos: int | None) -> Any:
    """BOS/EOS around each sequence where the GGUF says so; else ByteLevel's offsets only."""
    from tokenizers import processors

    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False)

    def around(seq: str, type_id: int) -> str:
        parts = [f"{tokens[bos]}:{type_id}"] if bos is not None else []
        parts.append(f"${seq}:{type_id}")
        parts += [f"{tokens[eos]}:{type_id}"] if eos is not None else []
        return " ".join(parts)

    specials = [(tokens[i], i) for i in dict.fromkeys((bos, eos)) if i is not None]
    return processors.TemplateProcessing(single=around("A", 0),
                                         pair=f"{around('A', 0)} {around('B', 1)}",
                                         special_tokens=specials)


def _token_id(gguf: GGUFFile, key: str, vocab_size: int) -> int | None:
    value = gguf.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise InvalidInputError(f"{gguf.path}: tokenizer.ggml.{key} is {value!r}, not a token"
                                f" id below {vocab_size}")
    return int(value)


def read_tokenizer(gguf: GGUFFile) -> GGUFTokenizer:
    """Rebuild the tokenizer of ``gguf`` (checked with :func:`check_tokenizer` first)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    check_tokenizer(gguf)
    tokens = [str(t) for t in gguf.require("tokenizer.ggml.tokens")]
    types = list(gguf.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    warnings = []
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            warnings.append(f"token {i} repeats token {vocab[token]} ({token!r}); the first"
                            " is kept")
            continue
        vocab[token] = i
    merges = []
    for line in gguf.require("tokenizer.ggml.merges"):
        parts = str(line).split(" ")
        if len(parts) != 2:
            raise InvalidInputError(f"{gguf.path}: merge {line!r} is not two tokens")
        merges.append((parts[0], parts[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    normalizer, pre = _pre_tokenizer(PRE_TOKENIZERS[str(gguf.get("tokenizer.ggml.pre",
                                                                  "default"))])
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    # Added tokens keep their ids: they are in the vocabulary already.
    for kind, add in ((CONTROL, tok.add_special_tokens), (USER_DEFINED, tok.add_tokens)):
        add([AddedToken(tokens[i], special=kind == CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] == kind and vocab.get(tokens[i]) == i])

    n = len(tokens)
    bos = _token_id(gguf, "bos_token_id", n)
    eos = _token_id(gguf, "eos_token_id", n)
    eot = _token_id(gguf, "eot_token_id", n)
    eos_ids = [i for i in (eos, eot) if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    add_bos = bool(gguf.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(gguf.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise InvalidInputError(f"{gguf.path}: the tokenizer adds a BOS/EOS token it does not"
                                " name")
    tok.post_processor = _post_processor(tokens, bos if add_bos else None,
                                         eos if add_eos else None)
    template_text = gguf.get("tokenizer.chat_template")
    return GGUFTokenizer(tok, bos, eos_ids, _token_id(gguf, "padding_token_id", n),
                         _token_id(gguf, "unknown_token_id", n), add_bos, add_eos,
                         str(template_text) if template_text else None, warnings)
