"""Export: checkpoint -> ONNX (metadata embedded) -> FP16 / INT8 Q/DQ ONNX -> TensorRT engine, plus the
runtimes that run them and a benchmark across every backend.

Imports deeplab, onnx and onnxruntime, never Ray. tensorrt and modelopt are imported inside the functions
that need them, so `--help` and the CPU paths work on a machine without a GPU.

Modules, lowest first: metadata (the deeplab.* metadata every exported file carries), samples (images for
parity, calibration and accuracy), cli (progress lines and one-line errors), runtime (engine and onnxruntime
runners), to_onnx (export + parity), precision (fp16 / int8 Q/DQ ONNX, accuracy in onnxruntime),
to_tensorrt (engine build, TensorRT 10 and 11), bench.
"""
from . import config  # noqa: F401  (registers the ``export`` config section)
