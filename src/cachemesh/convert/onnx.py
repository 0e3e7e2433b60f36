"""``--to onnx``: encoder transformers models and scikit-learn models into ONNX.

Two kinds of input:

- a Hugging Face encoder (BERT, RoBERTa, DistilBERT, …): exported with
  ``torch.onnx.export`` (the TorchScript-based exporter, ``dynamo=False``: it
  needs no extra package; the dynamo exporter needs onnxscript), batch and
  sequence dynamic. The task follows ``architectures[0]``:
  ``*ForSequenceClassification`` and ``*ForTokenClassification`` give
  ``logits``, ``*ForMaskedLM`` gives ``logits`` over the vocabulary, anything
  else is the bare encoder (``last_hidden_state``; pooling an embedding is the
  runtime's choice). Decoder LLMs go to ``--to ct2`` instead.
- a scikit-learn estimator saved with joblib/pickle (``*.joblib``, ``*.pkl``)
  or skops (``*.skops``): converted with skl2onnx, one float input
  ``input [batch, n_features]``; classifiers give ``label`` and their
  scores (``probabilities`` where the estimator has ``predict_proba``; no
  ZipMap). Loading a pickle runs code from the file:
  convert only models you would also serve.

Every export is checked before it is accepted: onnxruntime runs the exported
graph on a fixed, seeded input (with padding, for text models) and its outputs
must match the original model's (max abs difference ``ATOL``, labels equal),
or the conversion fails. The output directory::

    model.onnx               the graph and its weights
    config.json, tokenizer.json, …   copied from a transformers input
    cachemesh-convert.json   the manifest; runtime.inputs / runtime.outputs
                             name the graph's tensors
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConversionError, InvalidInputError
from .base import (
    Converter,
    ConvertOptions,
    ModelFacts,
    ModelInput,
    copy_side_files,
    dist_versions,
)

if TYPE_CHECKING:
    from ..jobs import JobRun

OPSET = 17
ATOL = 1e-3  # float32 graphs agree far closer; this catches a wrong graph, not rounding
# Encoder families the exporter handles with the inputs below.
ENCODER_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mpnet", "camembert",
    "deberta", "deberta-v2", "ernie", "nomic_bert", "modernbert",
}
SKLEARN_SUFFIXES = (".joblib", ".pkl", ".pickle", ".skops")
_TASKS = {  # architectures[0] suffix -> (task, AutoModel class, output name)
    "ForSequenceClassification": ("text-classification", "AutoModelForSequenceClassification",
                                  "logits"),
    "ForTokenClassification": ("token-classification", "AutoModelForTokenClassification",
                               "logits"),
    "ForMaskedLM": ("fill-mask", "AutoModelForMaskedLM", "logits"),
}
_FEATURES = ("feature-extraction", "AutoModel", "last_hidden_state")


class OnnxConverter(Converter):
    target = "onnx"
    name = "onnx-export"
    revision = 1

    def versions(self, model: ModelInput) -> dict[str, str]:
        if "config.json" in model.files:
            found = dist_versions("onnx", "torch", "transformers")
        else:
            found = dist_versions("onnx", "skl2onnx", "scikit-learn")
        return {**found, "opset": str(OPSET)}

    def check(self, model: ModelInput, options: ConvertOptions) -> ModelFacts:
        config = model.config()
        if config is not None:
            model_type = config.get("model_type")
            if model_type not in ENCODER_TYPES:
                hint = " (decoder language models convert with --to ct2)" \
                    if model_type in _DECODERS else ""
                raise InvalidInputError(
                    f"{model.source}: --to onnx converts encoder models"
                    f" ({', '.join(sorted(ENCODER_TYPES))}) and scikit-learn models, not"
                    f" model_type {model_type!r}{hint}"
                )
            if not any(p.endswith((".safetensors", ".bin")) for p in model.files):
                raise InvalidInputError(f"{model.source}: no weights (*.safetensors or *.bin)")
            architectures = list(config.get("architectures") or [])
            task, auto_class, output = _task_of(architectures)
            return ModelFacts(model_type=model_type, architectures=architectures, task=task,
                              extra={"kind": "transformers", "auto_class": auto_class,
                                     "output": output})
        estimators = sorted(p for p in model.files if p.endswith(SKLEARN_SUFFIXES))
        if len(estimators) == 1:
            return ModelFacts(model_type="sklearn", task=None,
                              extra={"kind": "sklearn", "file": estimators[0]})
        if len(estimators) > 1:
            raise InvalidInputError(
                f"{model.source}: several scikit-learn model files ({', '.join(estimators)});"
                " convert a directory that holds one"
            )
        raise InvalidInputError(
            f"{model.source}: --to onnx needs a transformers encoder (config.json) or one"
            f" scikit-learn model file ({', '.join(SKLEARN_SUFFIXES)})"
        )

    def convert(self, model: ModelInput, options: ConvertOptions, facts: ModelFacts,
                out: Path, run: JobRun) -> dict[str, Any]:
        out.mkdir(parents=True)
        if facts.extra["kind"] == "sklearn":
            return _convert_sklearn(model, facts, out, run)
        return _convert_transformers(model, facts, out, run)


_DECODERS = {"llama", "gpt2", "mistral", "qwen2", "qwen3", "bloom", "gemma", "gemma2", "phi",
             "phi3", "falcon", "gpt_neox", "gptj", "opt", "mpt"}


def _task_of(architectures: list[str]) -> tuple[str, str, str]:
    for arch in architectures[:1]:
        for suffix, task in _TASKS.items():
            if arch.endswith(suffix):
                return task
    return _FEATURES


def _convert_transformers(model: ModelInput, facts: ModelFacts, out: Path,
                          run: JobRun) -> dict[str, Any]:
    import numpy as np
    import torch
    import transformers

    run.progress(0.05, "loading the model (transformers, float32)")
    auto = getattr(transformers, facts.extra["auto_class"])
    torch_model = auto.from_pretrained(str(model.view), dtype=torch.float32).eval()
    accepted = inspect.signature(torch_model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]
    output = facts.extra["output"]
    vocab = int(getattr(torch_model.config, "vocab_size", 100) or 100)

    def sample(batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        if batch > 1:
            mask[1:, length // 2:] = 0  # padded rows: the mask must be honoured
        out = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
        return {n: out[n] for n in names}

    run.progress(0.2, f"exporting to ONNX (opset {OPSET})")
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[output] = {0: "batch"} if facts.task == "text-classification" else \
        {0: "batch", 1: "sequence"}
    example = sample(2, 8, seed=0)
    path = out / "model.onnx"

    class Graph(torch.nn.Module):
        # A fixed positional signature and one output tensor, whatever the
        # model's forward() takes and returns.
        def __init__(self) -> None:
            super().__init__()
            self.model = torch_model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return getattr(self.model(**dict(zip(names, tensors, strict=True))), output)

    with torch.no_grad():
        torch.onnx.export(
            Graph().eval(), tuple(example[n] for n in names), str(path), input_names=names,
            output_names=[output], dynamic_axes=axes, opset_version=OPSET, dynamo=False,
        )

    run.progress(0.7, "checking the ONNX graph against the original with onnxruntime")
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    check = sample(3, 13, seed=1)  # other shapes than the export's: dynamic axes work
    got = session.run([output], {n: t.numpy() for n, t in check.items()})[0]
    with torch.no_grad():
        want = getattr(torch_model(**check), output).numpy()
    if facts.task != "text-classification":
        # Padded positions of an encoder's output are unspecified; compare real tokens.
        keep = check["attention_mask"].numpy().astype(bool)
        got, want = got[keep], want[keep]
    diff = float(np.max(np.abs(got - want)))
    run.log(f"onnxruntime vs torch: max abs difference {diff:.3g} over {got.size} values")
    if not np.isfinite(diff) or diff > ATOL:
        raise ConversionError(
            f"the exported graph disagrees with the model: max abs difference {diff:.3g}"
            f" > {ATOL}"
        )
    copied = copy_side_files(model.view, out, ("config.json", *_side_files()))
    run.log(f"copied {', '.join(copied)}")
    return {
        "engine": "onnxruntime",
        "file": "model.onnx",
        "opset": OPSET,
        "inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]} for n in names],
        "outputs": [{"name": output, "dtype": "float32",
                     "shape": ["batch", "labels"] if facts.task == "text-classification"
                     else ["batch", "sequence", "features"]}],
        "tokenizer": "tokenizer.json" if "tokenizer.json" in copied else None,
        "labels": getattr(torch_model.config, "id2label", None)
        if facts.task in ("text-classification", "token-classification") else None,
    }


def _side_files() -> tuple[str, ...]:
    from .base import TOKENIZER_FILES

    return TOKENIZER_FILES


def _load_estimator(path: Path) -> Any:
    if path.suffix == ".skops":
        import skops.io as sio

        # The user asked to convert this file; its types are trusted as joblib's would be.
        return sio.load(path, trusted=sio.get_untrusted_types(file=path))
    import joblib

    return joblib.load(path)


def _convert_sklearn(model: ModelInput, facts: ModelFacts, out: Path,
                     run: JobRun) -> dict[str, Any]:
    import numpy as np

    try:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError:
        raise InvalidInputError("scikit-learn models need skl2onnx: install cachemesh[onnx]") \
            from None
    run.progress(0.05, f"loading {facts.extra['file']}")
    estimator = _load_estimator(model.view / facts.extra["file"])
    n_features = getattr(estimator, "n_features_in_", None)
    if not isinstance(n_features, int | np.integer):
        raise InvalidInputError(
            f"{facts.extra['file']}: {type(estimator).__name__} is not a fitted scikit-learn"
            " estimator (it has no n_features_in_)"
        )
    n_features = int(n_features)
    from sklearn.base import is_classifier

    classifier = is_classifier(estimator)
    has_proba = classifier and hasattr(estimator, "predict_proba")
    facts.task = "classification" if classifier else "regression"
    facts.extra["estimator"] = type(estimator).__name__
    facts.extra["n_features"] = n_features

    run.progress(0.2, f"converting {type(estimator).__name__} with skl2onnx")
    options = {id(estimator): {"zipmap": False}} if classifier else None
    graph = to_onnx(estimator, initial_types=[("input", FloatTensorType([None, n_features]))],
                    options=options, target_opset={"": OPSET, "ai.onnx.ml": 3})
    path = out / "model.onnx"
    path.write_bytes(graph.SerializeToString())

    run.progress(0.7, "checking the ONNX graph against the estimator with onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    x = np.random.default_rng(0).normal(size=(32, n_features)).astype(np.float32)
    results = session.run(None, {"input": x})
    if classifier:
        labels = results[0]
        agree = float(np.mean(labels == estimator.predict(x)))
        diff = 0.0
        if has_proba:
            diff = float(np.max(np.abs(results[1] - estimator.predict_proba(x))))
        run.log(f"onnxruntime vs scikit-learn: labels agree on {agree:.0%}, max probability"
                f" difference {diff:.3g}")
        if agree < 1.0 or diff > ATOL:
            raise ConversionError(
                f"the exported graph disagrees with the estimator (labels agree on {agree:.0%},"
                f" max probability difference {diff:.3g})"
            )
    else:
        got = results[0].reshape(len(x), -1)
        want = np.asarray(estimator.predict(x), dtype=np.float64).reshape(len(x), -1)
        diff = float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))
        run.log(f"onnxruntime vs scikit-learn: max relative difference {diff:.3g}")
        if diff > ATOL:
            raise ConversionError(f"the exported graph disagrees with the estimator ({diff:.3g})")
    return {
        "engine": "onnxruntime",
        "file": "model.onnx",
        "opset": OPSET,
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", n_features]}],
        "outputs": [{"name": n} for n in outputs],
        "classes": [c.item() if hasattr(c, "item") else c
                    for c in getattr(estimator, "classes_", [])] or None,
    }
