"""Export: checkpoint -> ONNX (metadata embedded) -> FP16 / INT8 Q/DQ ONNX -> OpenVINO IR or TensorRT engine,
plus the runtimes that run them and a benchmark across every backend.

Imports deeplab, onnx and onnxruntime, never Ray. tensorrt and modelopt are imported inside the functions
that need them, so `--help` and the CPU paths work on a machine without a GPU.

`export.metadata` is the bottom of the package (the metadata record every exported file carries),
`export.runners` runs each backend and `export.model_file` is the one place that opens every model file;
each module's docstring says what it is for.
"""
from . import config  # noqa: F401  (registers the ``export`` config section)
