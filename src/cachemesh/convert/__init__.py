"""Model conversion into inference formats, as cached, shared artifacts.

``cachemesh convert SOURCE --to ct2|onnx|safetensors`` (see service.py for the
flow, identity.py for the identity and the manifest, base.py for the
converter interface, and ct2.py, onnx.py and tp.py for the converters).
A GGUF input is first turned into a Hugging Face folder: gguf_model.py, with
gguf_file.py (reading, dequantizing) and gguf_tokenizer.py; shards.py writes
safetensors shards for both that and tp.py.
"""

from __future__ import annotations

from .base import CONVERTERS, Converter, ConvertOptions, ModelFacts, ModelInput, get_converter
from .identity import MANIFEST, read_manifest
from .service import BUCKET, Conversions, ConvertResult, convert, make_options, result_name

__all__ = [
    "BUCKET",
    "CONVERTERS",
    "MANIFEST",
    "Conversions",
    "ConvertOptions",
    "ConvertResult",
    "Converter",
    "ModelFacts",
    "ModelInput",
    "convert",
    "get_converter",
    "make_options",
    "read_manifest",
    "result_name",
]
