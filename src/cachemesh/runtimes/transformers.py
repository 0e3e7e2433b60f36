"""Hugging Face transformers models: text generation, classification, embeddings.

Weights load through cachemesh's own loader (:func:`cachemesh.load_pretrained`:
the parallel safetensors stream, no random init), never ``from_pretrained``'s;
the tokenizer and configs are read with transformers from the same directory.
A directory with ``adapter_config.json`` is a PEFT adapter over a base model
from another cache (``adapters.py``): ``base=SOURCE``, shared by every adapter
over it in the worker.

Parameters (``--model NAME=SOURCE,runtime=transformers,KEY=VALUE``)::

    task       generate | classify | embed; default from config.architectures
               (*ForCausalLM / *LMHeadModel: generate, *ForSequenceClassification:
               classify, anything else: embed)
    dtype      auto (the config's) | float32 | bfloat16 | float16
    device     cpu (default) | cuda | cuda:N
    base       the base model of an adapter: a path or any `cachemesh pull` source
    pooling    mean (default) | last | cls   how embeddings pool the last hidden states
    normalize  true (default): embeddings have unit length

Generative payloads follow ``generation.py`` (``generate`` and ``stream``), checked
and turned into text deltas by ``textgen.py`` as every text runtime does;
``stream`` first yields an empty chunk once the request is checked and the
prompt encoded, so that a bad request fails before any text is due. KServe V2
``predict`` takes a BYTES input of texts: a classifier answers ``label`` and
``scores``, an embedder ``embedding``, a generator ``text_output``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import InferenceInputError, InvalidInputError, LoadError
from . import adapters
from .base import Runtime
from .files import flag
from .textgen import IncrementalDecoder, StopStrings, TextRequest, parse_generate_request
from .types import InferenceRequest, InferenceResponse, Tensor

TASKS = ("generate", "classify", "embed")
POOLINGS = ("mean", "last", "cls")


def task_of(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures and isinstance(architectures[0], str) else ""
    if arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return "generate"
    if arch.endswith("ForSequenceClassification"):
        return "classify"
    return "embed"


def _task_of(model: str, config: dict[str, Any], named: Any) -> str:
    task = str(named) if named else task_of(config)
    if task not in TASKS:
        raise InvalidInputError(f"model {model!r}: task {task!r} is not one of {', '.join(TASKS)}")
    return task


def _signature(task: str, settings: Any) -> dict[str, Any]:
    """V2 metadata of a model of ``task``, whether loaded or not."""
    text = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    outputs = {
        "generate": [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}],
        "classify": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                     {"name": "scores", "datatype": "FP32", "shape": [-1, -1]}],
        "embed": [{"name": "embedding", "datatype": "FP32", "shape": [-1, -1]}],
    }[task]
    return {"platform": "transformers", "task": task,
            "inputs": settings.inputs or text, "outputs": settings.outputs or outputs}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return data


class TransformersRuntime(Runtime):
    name = "transformers"
    preload_at_start = True  # torch and transformers take seconds to import
    preload_packages = ("torch", "transformers", "tokenizers", "safetensors")
    #: When (unix time) the worker imported torch and transformers (``preload``).
    preload_times: ClassVar[tuple[float, float]] = (0.0, 0.0)

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        from .decoding import Counter

        self.model: Any = None
        self.tokenizer: Any = None
        self.task = ""
        self.context = 0
        self.eos_ids: frozenset[int] = frozenset()
        self.shared: adapters.SharedBase | None = None
        self.adapter = ""
        self.generated_tokens = Counter()
        self.cancelled = Counter()
        self.timings: dict[str, float] = {}  # load phases, in seconds

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def detect(cls, path: Path) -> int:
        if not path.is_dir():
            return 0
        if adapters.is_adapter(path):
            return 60
        weights = any(path.glob("*.safetensors")) or (
            path / "model.safetensors.index.json").is_file()
        if (path / "config.json").is_file() and weights:
            return 40
        return 0

    @classmethod
    def preload(cls) -> None:
        started = time.time()
        import torch  # noqa: F401
        import transformers

        # Resolving the lazy names imports the modules every load needs.
        for name in ("AutoConfig", "AutoTokenizer", "PreTrainedTokenizerFast", "PreTrainedModel",
                     "GenerationConfig"):
            getattr(transformers, name)
        cls.preload_times = (started, time.time())

    def load(self) -> None:
        params = self.settings.parameters
        path = Path(self.settings.path)
        dtype = str(params.get("dtype") or "auto")
        device = str(params.get("device") or "cpu")
        started = time.time()
        self.timings = {}
        if adapters.is_adapter(path):
            source = adapters.base_source(path, params)
            self.adapter = self.settings.name

            def load_base(base: str) -> tuple[Path, Any]:
                return Path(base), self._build(Path(base), device, dtype, params.get("task"))

            self.shared = adapters.attach(path, self.adapter, source, load_base=load_base,
                                          dtype=f"{dtype}/{device}")
            base_path = self.shared.path
            self.model = self.shared.model
            config_dir = base_path
            tokenizer_dir = path if _has_tokenizer(path) else base_path
        else:
            self.model = self._build(path, device, dtype, params.get("task"))
            config_dir = tokenizer_dir = path
        weights_done = time.time()
        config = _read_json(config_dir / "config.json")
        self.task = self._task(config, params.get("task"))
        self.tokenizer = self._tokenizer(tokenizer_dir)
        done = time.time()
        imports = type(self).preload_times
        # Durations, and when each phase ended (unix time: a benchmark lays them on
        # its own timeline).
        self.timings = {**self.timings, "imports_s": imports[1] - imports[0],
                        "weights_s": weights_done - started, "tokenizer_s": done - weights_done,
                        "imports_started_at": imports[0], "imports_done_at": imports[1],
                        "load_started_at": started, "weights_done_at": weights_done,
                        "tokenizer_done_at": done}
        self.context = _context_length(config, self.tokenizer)
        self.eos_ids = self._eos_ids(config)

    def _task(self, config: dict[str, Any], named: Any) -> str:
        return _task_of(self.settings.name, config, named)

    def _build(self, path: Path, device: str, dtype: str, task: Any) -> Any:
        from ..load import load_pretrained

        config = _read_json(path / "config.json")
        task = self._task(config, task)
        auto_class = None if task != "embed" or task_of(config) == "embed" else "AutoModel"
        return load_pretrained(path, auto_class, device=device, dtype=dtype,
                               on_phase=lambda phase: self.timings.__setitem__(
                                   f"{phase}_at", time.time()))

    def _tokenizer(self, path: Path) -> Any:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as exc:
            raise LoadError(f"{path}: cannot load the tokenizer: {exc}") from exc

    def _eos_ids(self, config: dict[str, Any]) -> frozenset[int]:
        ids: set[int] = set()
        generation = getattr(self.model, "generation_config", None)
        for value in (getattr(generation, "eos_token_id", None), config.get("eos_token_id"),
                      getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
        return frozenset(ids)

    def unload(self) -> None:
        if self.shared is not None:
            adapters.detach(self.shared, self.adapter)
            self.shared = None
        self.model = self.tokenizer = None

    def stats(self) -> dict[str, float]:
        return {"generated_tokens": self.generated_tokens.value,
                "cancelled_streams": self.cancelled.value, "base_loads": adapters.base_loads,
                **self.timings}

    def metadata(self) -> dict[str, Any]:
        return _signature(self.task, self.settings)

    @classmethod
    def describe(cls, settings: Any) -> dict[str, Any] | None:
        # The task comes from config.json (an adapter's: its base's, pulled already).
        path = Path(settings.path)
        params = settings.parameters
        if adapters.is_adapter(path):
            base = params.get("base")
            path = Path(base) if isinstance(base, str) and Path(base).is_dir() else None
        if path is None or not (path / "config.json").is_file():
            return None
        try:
            task = _task_of(settings.name, _read_json(path / "config.json"), params.get("task"))
        except (LoadError, InvalidInputError):
            return None  # the load says what is wrong
        return _signature(task, settings)

    # -- generation (runtimes/generation.py) --------------------------------------------

    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        req = parse_generate_request(payload)
        if req.kind == "embedding":
            return self._embed_payload(req.inputs)
        text, finish, prompt_tokens, count = "", "length", 0, 0
        for chunk in self._run(req):
            text += chunk["text"]
            if "finish_reason" in chunk:
                finish = chunk["finish_reason"]
                prompt_tokens = chunk["prompt_tokens"]
                count = chunk["completion_tokens"]
        return {"text": text, "finish_reason": finish, "prompt_tokens": prompt_tokens,
                "completion_tokens": count}

    def stream(self, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        req = parse_generate_request(payload)
        if req.kind == "embedding":
            raise InferenceInputError("embedding requests are not streamed")
        return self._run(req)

    def _run(self, req: TextRequest) -> Iterator[dict[str, Any]]:
        """Check the request and encode the prompt now; generate as the caller iterates."""
        from .decoding import sample_tokens

        self._need("generate")
        prompt_ids = self._prompt_ids(req)
        room = self.context - len(prompt_ids)
        if room <= 0:
            raise InferenceInputError(
                f"the prompt is {len(prompt_ids)} tokens; model {self.settings.name!r} takes at"
                f" most {self.context} tokens in all")
        tokens = sample_tokens(
            self.model, prompt_ids, max_new_tokens=min(req.max_tokens, room),
            temperature=req.temperature, top_p=req.top_p, eos_ids=self.eos_ids,
            seed=None if req.seed is None else req.seed % 2**63,
            step=self.shared.step(self.adapter) if self.shared is not None else None)
        return self._chunks(tokens, IncrementalDecoder(self._decode, prompt_ids),
                            StopStrings(req.stop), len(prompt_ids))

    def _chunks(self, tokens: Iterator[int], decoder: IncrementalDecoder, stops: StopStrings,
                prompt_tokens: int) -> Iterator[dict[str, Any]]:
        count, finish, done = 0, "length", False
        try:
            yield {"text": ""}
            for token in tokens:
                count += 1
                self.generated_tokens.add()
                if token in self.eos_ids:
                    break
                piece = stops.feed(decoder.push(token))
                if piece:
                    yield {"text": piece}
                if stops.stopped:
                    break
            else:
                token = None
            if token is not None and token in self.eos_ids:
                finish = "stop"
            rest = "" if stops.stopped else stops.feed(decoder.flush())
            rest += stops.flush()
            if stops.stopped:
                finish = "stop"
            if rest:
                yield {"text": rest}
            done = True
            yield {"text": "", "finish_reason": finish, "prompt_tokens": prompt_tokens,
                   "completion_tokens": count}
        finally:
            tokens.close()  # type: ignore[attr-defined]
            if not done:
                self.cancelled.add()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _prompt_ids(self, req: TextRequest) -> list[int]:
        if req.kind == "completion":
            ids = list(self.tokenizer(req.prompt)["input_ids"])
        else:
            ids = self._chat_ids(req.messages)
        if not ids:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if bos is None:
                raise InferenceInputError("the prompt is empty and the model has no BOS token")
            ids = [bos]
        return ids

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InferenceInputError(
                f"model {self.settings.name!r} has no chat template (its tokenizer config has"
                " no chat_template); send plain prompts to /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": m["role"], "content": m["content"]} for m in messages],
                tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja2's errors, raise_exception() in the template
            raise InferenceInputError(
                f"model {self.settings.name!r}: the chat template refused the messages:"
                f" {type(exc).__name__}: {exc}") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _need(self, task: str) -> None:
        if self.task != task:
            verb = {"generate": "generate text", "classify": "classify",
                    "embed": "embed"}[task]
            raise InferenceInputError(
                f"model {self.settings.name!r} does not {verb}; its task is {self.task}")

    # -- embeddings and classification -----------------------------------------------

    def _embed_payload(self, texts: list[str]) -> dict[str, Any]:
        if not texts:
            raise InferenceInputError("an embedding request needs 'input', a non-empty list of"
                                      " strings")
        vectors, used = self._embed(texts)
        return {"embeddings": vectors.tolist(), "prompt_tokens": used}

    def _encode_each(self, texts: list[str]) -> list[list[int]]:
        out = []
        for i, text in enumerate(texts):
            ids = list(self.tokenizer(text)["input_ids"])
            if not ids:
                raise InferenceInputError(f"input {i} is empty")
            if len(ids) > self.context:
                raise InferenceInputError(
                    f"input {i} is {len(ids)} tokens; model {self.settings.name!r} takes at"
                    f" most {self.context}")
            out.append(ids)
        return out

    def _forward(self, ids: list[int]) -> Any:
        import torch

        device = next(self.model.parameters()).device
        tensor = torch.tensor([ids], dtype=torch.long, device=device)
        with torch.inference_mode():
            if self.shared is not None:
                with self.shared.step(self.adapter)():
                    return self.model(input_ids=tensor, output_hidden_states=True)
            return self.model(input_ids=tensor, output_hidden_states=True)

    def _embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        self._need_any(("embed", "generate"))
        pooling = str(self.settings.parameters.get("pooling") or "mean")
        if pooling not in POOLINGS:
            raise InvalidInputError(f"pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
        normalize = self.settings.parameters.get("normalize")
        normalize = True if normalize is None else flag(normalize)
        rows, used = [], 0
        for ids in self._encode_each(texts):
            out = self._forward(ids)
            hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else (
                out.last_hidden_state)
            hidden = hidden[0].float()
            vec = {"mean": lambda h: h.mean(0), "last": lambda h: h[-1],
                   "cls": lambda h: h[0]}[pooling](hidden)
            if normalize:
                vec = vec / vec.norm().clamp_min(1e-12)
            rows.append(vec.cpu().numpy())
            used += len(ids)
        return np.stack(rows).astype(np.float32), used

    def _need_any(self, tasks: tuple[str, ...]) -> None:
        if self.task not in tasks:
            raise InferenceInputError(
                f"model {self.settings.name!r} does not embed; its task is {self.task}")

    def _classify(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        self._need("classify")
        labels = getattr(self.model.config, "id2label", None) or {}
        scores = []
        for ids in self._encode_each(texts):
            logits = self._forward(ids).logits[0].float()
            scores.append(torch.softmax(logits, -1).cpu().numpy())
        probs = np.stack(scores).astype(np.float32)
        names = np.array([str(labels.get(int(i), int(i))).encode() for i in probs.argmax(1)],
                         dtype=object)
        return names, probs

    # -- KServe V2 ------------------------------------------------------------------

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        texts = _texts(request)
        if self.task == "classify":
            names, probs = self._classify(texts)
            return InferenceResponse(outputs=[Tensor("label", "BYTES", names.shape, names),
                                              Tensor.of("scores", probs)])
        if self.task == "embed":
            vectors, _ = self._embed(texts)
            return InferenceResponse(outputs=[Tensor.of("embedding", vectors)])
        params = {k: v for k, v in request.parameters.items()
                  if k in ("max_tokens", "temperature", "top_p", "stop", "seed")}
        if isinstance(params.get("stop"), str):
            params["stop"] = [params["stop"]]
        out = np.empty(len(texts), dtype=object)
        for i, text in enumerate(texts):
            answer = self.generate({"kind": "completion", "prompt": text, **params})
            out[i] = answer["text"].encode()
        return InferenceResponse(outputs=[Tensor("text_output", "BYTES", out.shape, out)])


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in (
        "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt"))


def _context_length(config: dict[str, Any], tokenizer: Any) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", 0)
    return int(value) if isinstance(value, int) and 0 < value < 10**7 else 2048


def _texts(request: InferenceRequest) -> list[str]:
    tensor = next((t for t in request.inputs if t.datatype == "BYTES"), None)
    if tensor is None:
        raise InferenceInputError("send the texts as a BYTES input")
    out = []
    for v in tensor.data.reshape(-1):
        try:
            out.append(v.decode() if isinstance(v, bytes) else str(v))
        except UnicodeDecodeError:
            raise InferenceInputError("a text is not valid UTF-8") from None
    if not out:
        raise InferenceInputError("no texts in the request")
    return out
