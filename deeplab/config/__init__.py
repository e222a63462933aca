"""One config system for every entry point: dataclasses loaded from YAML, overridden on the command line.

An experiment file has one mapping per section; each maps onto one registered dataclass. deeplab declares
``model``, ``data``, ``train`` and ``inference``; the packages above it declare theirs next to their code and
register them on import (`register_section`), so this package knows none of them. A section whose package
is not imported in this process is kept as written and saved back whole. ``--set section.field=value``
overrides any field of a registered section from any command.

A config that builds is valid: each section checks its own fields when it is built (types first, then
values), and the checks registered across sections run on the whole experiment. So every mistake a config
can hold is answered on the driver, in one line naming the field, the value and what is allowed, before Ray
starts. A ConfigError from a file names the file; one from ``--set`` (or a shorthand flag) names that item.
Paths that must exist are checked only when a command builds its config from the command line
(`load_config`, `config_from_args`): a checkpoint's own experiment must still load on a machine that lacks
its training paths.

One module per job, every public name importable from ``deeplab.config`` as before:
``values`` (type conversion, ConfigError), ``sections`` (Section and deeplab's sections), ``experiment`` (the
section registry, ExperimentConfig, loading and saving), ``flags`` (--config, --set and shorthand flags). The
training batch arithmetic lives in deeplab.train_batch, next to the training loop.
"""
from .experiment import (
    OWN_SECTIONS,
    PATH_FIELDS,
    SECTION_CLASSES,
    ExperimentConfig,
    experiment_from_dict,
    load_config,
    model_config_from_dict,
    register_section,
    save_config,
    to_plain,
)
from .flags import ALPHA_ALIAS, INFERENCE_ALIASES, Alias, add_config_args, config_from_args
from .sections import (
    AMP_MODES,
    ATROUS_LAYOUTS,
    HEADS,
    MODEL_STRIDES,
    PAPER_SCALES,
    STRIDES_ALLOWED,
    SYNTHETIC_MAX_CLASSES,
    DataConfig,
    InferenceConfig,
    ModelConfig,
    Section,
    TrainConfig,
)
from .values import ConfigError, fail_value, show_value

# deeplab.train_batch imports this package's values, so it is loaded on first use here rather than imported:
# an import at the top would be a circle (deeplab.config -> deeplab.train_batch -> deeplab.config).
_TRAIN_BATCH = ("split_batch", "per_worker_batch", "bn_momentum_warning", "evaluations_per_run")

# The names deeplab/config.py offered before the split (the helpers its modules share stay in their module).
__all__ = ["OWN_SECTIONS", "PATH_FIELDS", "SECTION_CLASSES", "ExperimentConfig", "experiment_from_dict",
           "load_config", "model_config_from_dict", "register_section", "save_config", "to_plain",
           "ALPHA_ALIAS", "INFERENCE_ALIASES", "Alias", "add_config_args", "config_from_args",
           "AMP_MODES", "ATROUS_LAYOUTS", "HEADS", "MODEL_STRIDES", "PAPER_SCALES", "STRIDES_ALLOWED",
           "SYNTHETIC_MAX_CLASSES", "DataConfig", "InferenceConfig", "ModelConfig", "Section", "TrainConfig",
           "ConfigError", "fail_value", "show_value", *_TRAIN_BATCH]


def __getattr__(name):
    if name in _TRAIN_BATCH:
        from .. import train_batch

        return getattr(train_batch, name)
    raise AttributeError(f"module 'deeplab.config' has no attribute {name!r}")
