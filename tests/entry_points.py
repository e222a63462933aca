"""Every command a user can type, as the argv that follows `python` (run from the repository root).

One list for the tests that run each command in a fresh interpreter (its --help, a tiny real run, its defaults):
a command added to the project is added here, and every such test then covers it.
"""

COMMANDS = {
    # deeplab: one process, torch only
    "deeplab.evaluate": ["-m", "deeplab.evaluate"],
    "deeplab.predict": ["-m", "deeplab.predict"],
    "deeplab.data": ["-m", "deeplab.data"],
    "deeplab.data.bench": ["-m", "deeplab.data.bench"],
    "deeplab.import_torchvision": ["-m", "deeplab.import_torchvision"],
    "deeplab.bench_model": ["-m", "deeplab.bench_model"],
    "deeplab.receptive": ["-m", "deeplab.receptive"],
    # export: model files and runtimes, no Ray
    "export.to_onnx": ["-m", "export.to_onnx"],
    "export.to_openvino": ["-m", "export.to_openvino"],
    "export.to_tensorrt": ["-m", "export.to_tensorrt"],
    "export.evaluate": ["-m", "export.evaluate"],
    "export.predict": ["-m", "export.predict"],
    "export.gpu_check": ["-m", "export.gpu_check"],
    "export/bench.py": ["export/bench.py"],
    # cluster: where Ray meets the model
    "cluster.train": ["-m", "cluster.train"],
    "cluster.demo": ["-m", "cluster.demo"],
    "cluster.check_config": ["-m", "cluster.check_config"],
    "cluster.down": ["-m", "cluster.down"],
    "cluster.segment": ["-m", "cluster.segment"],
    "cluster.serve": ["-m", "cluster.serve"],
    "cluster.bench": ["-m", "cluster.bench"],
    "cluster.bench_serve": ["-m", "cluster.bench_serve"],
    "cluster.spot_watch": ["-m", "cluster.spot_watch"],
    # tuning: Ray Tune
    "tuning.search_rates": ["-m", "tuning.search_rates"],
}
