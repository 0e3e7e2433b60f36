"""scikit-learn models saved with joblib, pickle or skops.

Files, in this order: the ``uri`` parameter (MLServer's ``model-settings.json``
writes ``"uri": "./model.joblib"``), then ``model.joblib``, ``model.pkl``,
``model.pickle``, ``model.skops``, then the only ``*.joblib``/``*.pkl``/``*.skops``.

joblib and pickle run code from the file when it is read: use them for sources
you trust. For the others set ``trusted=false``: only a ``.skops`` file is
accepted, and only with the types that skops deems safe plus those you list
in ``trusted_types`` (for example ``["sklearn.svm._classes.SVC"]``); a file that
needs anything else is refused with the list of what it needs.

Outputs: ``predict`` (the default), ``predict_proba``, ``decision_function``,
``transform``, asked for by name in the request's ``outputs``. Inputs: one
tensor ``[N, features]``, named ``input-0`` (FP64) in the metadata, as KServe's
sklearn server names it; a request may use another name, and several inputs are
stacked as columns in their order. What sklearn
rejects with ValueError (a wrong number of features, NaN) is the request's fault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InferenceInputError, ModelLoadError
from .base import Runtime
from .files import flag, single_file, uri_file
from .types import InferenceRequest, InferenceResponse, Tensor, datatype_of

SUFFIXES = (".joblib", ".pkl", ".pickle", ".skops")
DEFAULT_FILES = ("model.joblib", "model.pkl", "model.pickle", "model.skops")
METHODS = ("predict", "predict_proba", "decision_function", "transform")
# The name V2 metadata gives the input (KServe's sklearn server's convention). A request
# may name its input anything: the features are taken by position.
INPUT = "input-0"


def model_file(path: Path, uri: str | None = None) -> Path:
    """The file to load from a model directory (or the file itself)."""
    if path.is_file():
        return path
    if uri:
        return uri_file(path, uri)
    for name in DEFAULT_FILES:
        if (path / name).is_file():
            return path / name
    return single_file(path, SUFFIXES, "model file", DEFAULT_FILES)


class SKLearnRuntime(Runtime):
    name = "sklearn"
    batchable = True  # estimators predict row by row

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.model: Any = None

    @classmethod
    def detect(cls, path: Path) -> int:
        if path.is_file():
            return 50 if path.suffix in SUFFIXES else 0
        return 50 if any(p.suffix in SUFFIXES for p in path.iterdir() if p.is_file()) else 0

    @classmethod
    def preload(cls) -> None:
        # The estimator families a pickle most often names; importing them here
        # keeps the framework out of the first model's measured size.
        import importlib

        import joblib  # noqa: F401

        for module in ("sklearn.base", "sklearn.svm", "sklearn.linear_model", "sklearn.tree",
                       "sklearn.ensemble", "sklearn.neighbors", "sklearn.pipeline",
                       "sklearn.preprocessing"):
            try:
                importlib.import_module(module)
            except ImportError:
                pass

    def load(self) -> None:
        params = self.settings.parameters
        file = model_file(Path(self.settings.path), params.get("uri"))
        trusted = flag(params.get("trusted", True))
        if file.suffix == ".skops":
            self.model = _load_skops(file, trusted, params.get("trusted_types") or [])
        elif not trusted:
            raise ModelLoadError(
                f"{file.name}: joblib and pickle files run code when read; this model is not"
                " trusted (trusted=false), so only a .skops file is accepted"
            )
        else:
            import joblib

            self.model = joblib.load(file)
        if not hasattr(self.model, "predict") and not hasattr(self.model, "transform"):
            raise ModelLoadError(f"{file.name} holds a {type(self.model).__name__}, not an estimator")
        self._warm_up()

    def _warm_up(self) -> None:
        # sklearn's first call in a process pays for lazy imports and thread-pool
        # inspection (tens of ms): pay it during the load, not in a request.
        n = getattr(self.model, "n_features_in_", None)
        method = getattr(self.model, "predict", None)
        if isinstance(n, int) and method is not None:
            try:
                method(np.zeros((1, n)))
            except Exception:  # a model that rejects zeros still serves real inputs
                pass

    def unload(self) -> None:
        self.model = None

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        x = _features(request)
        outputs = []
        for name in request.wants() or ["predict"]:
            if name not in METHODS or not hasattr(self.model, name):
                have = [m for m in METHODS if hasattr(self.model, m)]
                raise InferenceInputError(
                    f"model {self.settings.name!r} has no output {name!r} (it has {', '.join(have)})"
                )
            try:
                result = getattr(self.model, name)(x)
            except ValueError as exc:  # sklearn's verdict on the input
                raise InferenceInputError(f"model {self.settings.name!r}: {exc}") from exc
            outputs.append(Tensor.of(name, np.asarray(result)))
        return InferenceResponse(outputs=outputs)

    def metadata(self) -> dict[str, Any]:
        inputs, outputs = self.settings.inputs, self.settings.outputs
        if not inputs:
            n = getattr(self.model, "n_features_in_", None)
            inputs = [{"name": INPUT, "datatype": "FP64", "shape": [-1, n if n else -1]}]
        if not outputs:
            classes = getattr(self.model, "classes_", None)
            dt = datatype_of(np.asarray(classes)) if classes is not None else "FP64"
            outputs = [{"name": "predict", "datatype": dt, "shape": [-1]}]
        return {"platform": "sklearn", "inputs": inputs, "outputs": outputs}

    @classmethod
    def describe(cls, settings: Any) -> dict[str, Any] | None:
        # The number of features (n_features_in_) is inside the pickle, which runs code
        # when read: only a load (in a worker) may read it, unless model-settings.json
        # declares both sides.
        if settings.inputs and settings.outputs:
            return {"platform": "sklearn", "inputs": settings.inputs,
                    "outputs": settings.outputs}
        return None


def _load_skops(file: Path, trusted: bool, trusted_types: list[str]) -> Any:
    import skops.io as sio

    needed = sio.get_untrusted_types(file=file)
    if trusted:
        allow = needed  # the source is trusted: whatever the file needs
    else:
        missing = sorted(set(needed) - set(trusted_types))
        if missing:
            raise ModelLoadError(
                f"{file.name} needs types that are not trusted: {', '.join(missing)};"
                " list them in the model's trusted_types parameter if you trust them"
            )
        allow = list(trusted_types)
    return sio.load(file, trusted=allow)


def _features(request: InferenceRequest) -> np.ndarray:
    if not request.inputs:
        raise InferenceInputError("the request has no inputs")
    cols = []
    for t in request.inputs:
        a = t.data
        if t.datatype == "BYTES":
            a = np.array([v.decode() if isinstance(v, bytes) else v for v in a.reshape(-1)],
                         dtype=object).reshape(a.shape)
            if a.ndim == 2 and a.shape[1] == 1:
                a = a[:, 0]
        elif a.ndim == 1:
            a = a.reshape(1, -1) if len(request.inputs) == 1 else a.reshape(-1, 1)
        elif a.ndim > 2:
            a = a.reshape(a.shape[0], -1)
        cols.append(a)
    return cols[0] if len(cols) == 1 else np.column_stack(cols)
