"""Decoder language models converted to CTranslate2, generating text (CPU by default).

Serves what ``cachemesh convert SRC --to ct2`` writes (``convert/ct2.py``)::

    model.bin, config.json, vocabulary.json    CTranslate2's model
    tokenizer.json, tokenizer_config.json, …   the source model's tokenizer files
    chat_template.jinja, generation_config.json
    cachemesh-convert.json                     the manifest: runtime.class, quantization

and any directory CTranslate2's own converters wrote, given the tokenizer
files beside it. Only ``Generator`` models (decoder-only) are served here;
a ``Translator`` or ``Encoder`` conversion is refused at load with a message
that says so.

Text goes through the generation contract (``runtimes/generation.py``):
``generate`` answers one :class:`~.generation.GenerateResult`, ``stream``
yields an empty chunk as soon as the request is accepted (before the prompt is
processed), text deltas, and a last chunk with ``finish_reason`` and the token
counts; both run the same token loop (``Generator.generate_tokens``), so a
streamed answer is, token for token, the answer ``generate`` gives. Closing
the stream stops CTranslate2 within a token. The
prompt of a ``completion`` is tokenized as the tokenizer does by default
(with its BOS where it adds one); a ``chat`` is rendered with the model's chat
template (``add_generation_prompt``) and tokenized without adding special
tokens again. Generation ends at the model's end tokens (the tokenizer's EOS
and every ``eos_token_id`` of generation_config.json), after ``max_tokens``
(``finish_reason: "length"``) or at a stop string (not part of the text). An
end token counts as a completion token and is not part of the text.
``stats`` counts generated tokens and streams closed before their end.
``temperature: 0`` is greedy; otherwise CTranslate2 samples from the whole
vocabulary at that temperature, cut to ``top_p``.

``seed`` is accepted and has no effect: CTranslate2 seeds the sampler of each
of its threads once, the first time that thread samples
(``ctranslate2/random.cc``: a ``thread_local`` generator), so a seed set per
request would reach some requests and not others. Greedy decoding is
deterministic.

V2 ``predict`` serves the same model to V2 clients: one BYTES input (prompts,
``text_input`` by convention), one BYTES output ``text_output`` of the same
shape; ``max_tokens``, ``temperature``, ``top_p`` and ``stop`` come from the
request's parameters.

Parameters: ``device`` (``cpu``; ``cuda`` where CTranslate2 was built with
it), ``compute_type`` (default ``default``: the type the conversion chose,
``--quantization``, or the checkpoint's own, converted by CTranslate2 to one
the device supports; ``auto`` picks the fastest the device supports, which may
quantize a float model), ``threads`` (CTranslate2's intra_threads; default:
the worker's thread budget, ``CACHEMESH_SERVE_WORKER_THREADS``; 0 lets it
pick), ``inter_threads`` (generations that run at once, default 1; more queue
behind them), ``context_length`` (prompt + completion limit; default: what the
conversion recorded from the source config, else none).

Memory: on CPU CTranslate2 holds the weights in its own allocations, so the
worker's RSS measurement is the model's size (``memory_bytes`` says None); on
a GPU the weights are not in RSS, and the size of model.bin stands for them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..config import worker_threads
from ..errors import InferenceInputError, ModelLoadError
from .base import ModelSettings, Runtime
from .files import conversion_runtime, int_param, read_json_object
from .generation import GenerateResult, StreamChunk
from .textgen import IncrementalDecoder, StopStrings, TextRequest, parse_generate_request
from .types import InferenceRequest, InferenceResponse, Tensor

VOCABULARIES = ("vocabulary.json", "vocabulary.txt", "shared_vocabulary.json",
                "shared_vocabulary.txt")
OUTPUT = "text_output"


def _load_tokenizer(path: Path) -> Any:
    """The source model's tokenizer, from the files the conversion copied.

    With tokenizer.json, the generic fast tokenizer reads it (with
    tokenizer_config.json and the chat template) and nothing else: ``AutoTokenizer``
    imports torch on the way (200 MB of RSS, measured on transformers 5.23), which
    the worker would count as this model's size. Without it (a SentencePiece-only
    model), ``AutoTokenizer`` picks the model's own class.
    """
    try:
        if (path / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, …
        raise ModelLoadError(
            f"no usable tokenizer in {path} ({type(exc).__name__}: {exc}); the directory"
            " needs the source model's tokenizer files (tokenizer.json, …)"
        ) from exc


class CTranslate2Runtime(Runtime):
    name = "ctranslate2"

    def __init__(self, settings: ModelSettings) -> None:
        super().__init__(settings)
        self.generator: Any = None
        self.tokenizer: Any = None
        self.end_ids: list[int] = []
        self.context_length: int | None = None
        self.device = "cpu"
        self._stats_lock = threading.Lock()
        self._stats = {"generated_tokens": 0, "cancelled_streams": 0}

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    def detect(cls, path: Path) -> int:
        if not path.is_dir():
            return 0
        if conversion_runtime(path).get("engine") == "ctranslate2":
            return 95
        if (path / "model.bin").is_file() and (path / "config.json").is_file() and any(
                (path / v).is_file() for v in VOCABULARIES):
            return 80
        return 0

    @classmethod
    def preload(cls) -> None:
        try:
            import ctranslate2  # noqa: F401
            import jinja2  # noqa: F401  (chat templates)
            from transformers import PreTrainedTokenizerFast  # noqa: F401
        except ImportError:
            pass  # load() says what to install

    def load(self) -> None:
        try:
            import ctranslate2
            import transformers  # noqa: F401
        except ImportError as exc:
            raise ModelLoadError(
                "the ctranslate2 runtime needs ctranslate2 and transformers: install cachemesh[ct2]"
            ) from exc
        path = Path(self.settings.path)
        params = self.settings.parameters
        runtime = conversion_runtime(path)
        kind = runtime.get("class", "Generator")
        if kind != "Generator":
            raise ModelLoadError(
                f"{path} holds a CTranslate2 {kind}; the ctranslate2 runtime serves decoder"
                " language models (Generator) only"
            )
        self.tokenizer = _load_tokenizer(path)  # cheap, and a reason to stop before the weights
        self.device = str(params.get("device") or "cpu")
        compute_type = str(params.get("compute_type") or "default")
        try:
            self.generator = ctranslate2.Generator(
                str(path), device=self.device, compute_type=compute_type,
                intra_threads=int_param(params, "threads", worker_threads()),
                inter_threads=int_param(params, "inter_threads", 1, minimum=1),
            )
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(f"CTranslate2 cannot load {path}: {exc}") from exc
        self.end_ids = self._end_ids(path)
        self.context_length = int_param(params, "context_length", None, minimum=1)
        if self.context_length is None and isinstance(runtime.get("context_length"), int):
            self.context_length = runtime["context_length"]

    def _end_ids(self, path: Path) -> list[int]:
        ids: list[int] = []
        eos = (read_json_object(path / "generation_config.json") or {}).get("eos_token_id")
        for value in (eos if isinstance(eos, list) else [eos]) + [self.tokenizer.eos_token_id]:
            if isinstance(value, int) and value not in ids:
                ids.append(value)
        return ids

    def unload(self) -> None:
        self.generator = None
        self.tokenizer = None

    def memory_bytes(self) -> int | None:
        if self.device == "cpu":
            return None
        weights = Path(self.settings.path) / "model.bin"
        return weights.stat().st_size if weights.is_file() else None

    def metadata(self) -> dict[str, Any]:
        return self.describe(self.settings)

    @classmethod
    def describe(cls, settings: Any) -> dict[str, Any]:
        return {
            "platform": "ctranslate2",
            "inputs": settings.inputs or [
                {"name": "text_input", "datatype": "BYTES", "shape": [-1]}],
            "outputs": settings.outputs or [
                {"name": OUTPUT, "datatype": "BYTES", "shape": [-1]}],
        }

    # -- generation ----------------------------------------------------------------

    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        parts: list[str] = []
        last: dict[str, Any] = {}
        for chunk in self.stream(payload):
            parts.append(chunk["text"])
            last = chunk
        result: GenerateResult = {
            "text": "".join(parts), "finish_reason": last["finish_reason"],
            "prompt_tokens": last["prompt_tokens"],
            "completion_tokens": last["completion_tokens"],
        }
        return dict(result)

    def stream(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        request = parse_generate_request(payload)
        if request.kind == "embedding":
            raise InferenceInputError(
                f"model {self.settings.name!r} generates text; it does not compute embeddings"
            )
        # Check and tokenize before the first chunk, so that a bad request fails the
        # call rather than a stream that already started.
        prompt_ids = self._prompt_ids(request)
        max_new = self._budget(request, len(prompt_ids))
        return self._tokens(request, prompt_ids, max_new)

    def _prompt_ids(self, request: TextRequest) -> list[int]:
        tokenizer = self.tokenizer
        if request.kind == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise InferenceInputError(
                    f"model {self.settings.name!r} has no chat template; use completions"
                )
            try:
                text = tokenizer.apply_chat_template(request.messages, tokenize=False,
                                                     add_generation_prompt=True)
            except Exception as exc:  # jinja2's TemplateError: the template refused the chat
                raise InferenceInputError(
                    f"model {self.settings.name!r}: the chat template refused these messages:"
                    f" {exc}"
                ) from exc
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(request.prompt)["input_ids"]
        if not ids:
            if tokenizer.bos_token_id is None:
                raise InferenceInputError("the prompt is empty and the model has no BOS token")
            ids = [tokenizer.bos_token_id]
        return list(ids)

    def _budget(self, request: TextRequest, prompt_tokens: int) -> int:
        limit = self.context_length
        if limit is None:
            return request.max_tokens
        if prompt_tokens >= limit:
            raise InferenceInputError(
                f"the prompt is {prompt_tokens} tokens; model {self.settings.name!r} takes at"
                f" most {limit} tokens of prompt and completion together"
            )
        return min(request.max_tokens, limit - prompt_tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _tokens(self, request: TextRequest, prompt_ids: list[int],
                max_new: int) -> Iterator[dict[str, Any]]:
        greedy = request.greedy
        decoder = IncrementalDecoder(self._decode, prompt_ids)
        stops = StopStrings(request.stop)
        generated, ended, finished = 0, False, False
        end_ids = set(self.end_ids)
        steps = self.generator.generate_tokens(
            self.tokenizer.convert_ids_to_tokens(prompt_ids),
            max_length=max_new,
            sampling_topk=1 if greedy else 0,  # 0: the whole vocabulary
            sampling_topp=1.0 if greedy else request.top_p,
            sampling_temperature=1.0 if greedy else request.temperature,
            end_token=self.end_ids or None,
        )
        try:
            # The request is accepted: an empty first chunk lets the adapter answer
            # (and send its headers) before the prompt is even processed.
            yield StreamChunk(text="")
            for step in steps:
                generated += 1
                self._count("generated_tokens")
                if step.token_id in end_ids:  # yielded, counted, not part of the text
                    ended = True
                    break
                text = stops.feed(decoder.push(step.token_id))
                if text:
                    yield StreamChunk(text=text)
                if stops.stopped:
                    break
            steps.close()  # stops CTranslate2 at a stop string
            reason = "stop" if stops.stopped or ended else "length"
            tail = ""
            if not stops.stopped:
                tail = stops.feed(decoder.flush())
                tail += stops.flush()
                reason = "stop" if stops.stopped else reason
            if tail:
                yield StreamChunk(text=tail)
            finished = True
            yield StreamChunk(text="", finish_reason=reason,
                              prompt_tokens=len(prompt_ids), completion_tokens=generated)
        finally:
            steps.close()  # the consumer went away: stop CTranslate2 within a token
            if not finished:
                self._count("cancelled_streams")

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += n

    def stats(self) -> dict[str, float]:
        """Running counts: tokens generated, streams their consumer closed early."""
        with self._stats_lock:
            return dict(self._stats)

    # -- KServe V2 -----------------------------------------------------------------

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        texts = [t for t in request.inputs if t.datatype == "BYTES"]
        if len(request.inputs) != 1 or len(texts) != 1:
            raise InferenceInputError(
                f"model {self.settings.name!r} takes one BYTES input of prompts (text_input)"
            )
        for name in request.wants():
            if name != OUTPUT:
                raise InferenceInputError(
                    f"model {self.settings.name!r} has no output {name!r} (it has {OUTPUT})"
                )
        [prompts] = texts
        params = {k: request.parameters[k] for k in ("max_tokens", "temperature", "top_p",
                                                     "stop", "seed") if k in request.parameters}
        answers = np.empty(prompts.data.shape, dtype=object)
        flat = answers.reshape(-1)
        for i, raw in enumerate(prompts.data.reshape(-1)):
            try:
                prompt = raw.decode() if isinstance(raw, bytes) else str(raw)
            except UnicodeDecodeError:
                raise InferenceInputError(f"prompt {i} is not UTF-8 text") from None
            flat[i] = self.generate({"kind": "completion", "prompt": prompt, **params})[
                "text"].encode()
        return InferenceResponse(outputs=[Tensor(OUTPUT, "BYTES", answers.shape, answers)])
