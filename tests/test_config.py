"""One config system: YAML files, --set overrides, one-line errors naming the field."""
from pathlib import Path

import pytest

import cluster  # noqa: F401  (cluster, export and tuning register their sections, tested here with deeplab's)
import export  # noqa: F401
import tuning  # noqa: F401
from deeplab.config import ConfigError, experiment_from_dict, load_config, save_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("model:\n  backbone: resnet50\n  multi_grid: [1, 2, 1]\ntrain:\n  lr: 0.01\n")
    cfg = load_config(p, ["model.output_stride=8", "data.crop_size=321", "model.aspp_rates=[6,12,18,24]"])
    assert cfg.model.backbone == "resnet50" and cfg.model.multi_grid == (1, 2, 1)
    assert cfg.model.output_stride == 8 and cfg.data.crop_size == 321 and cfg.train.lr == 0.01
    assert cfg.model.aspp_rates == (6, 12, 18, 24)
    out = tmp_path / "saved.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg


@pytest.mark.parametrize("text,needle", [
    ("model:\n  backbon: resnet50\n", "unknown field(s) backbon"),
    ("modle: {}\n", "unknown section(s) modle"),
    ("model:\n  output_stride: 12\n", "output_stride=12"),
    ("model: [1, 2\n", "not valid YAML"),
    # the sections of the packages above deeplab, registered by them
    ("cluster:\n  num_wrkers: 2\n", "bad.yaml: cluster: unknown field(s) num_wrkers; known: "),
    ("tune:\n  grace_period: 0\n", "bad.yaml: tune.grace_period=0 must be >= 1"),
    ("clustr:\n  num_workers: 2\n", "bad.yaml: unknown section(s) clustr; did you mean cluster?"),
    ("inference:\n  scales: [0]\n", "bad.yaml: inference.scales=[0] must be one or more scales > 0"),
    ("segment: [1, 2]\n", "bad.yaml: segment: expected a mapping, got list"),
])
def test_bad_config_names_file_and_field(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(info.value).startswith(str(p)) and needle in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
        load_config(None, ["output_stride=8"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_configs_in_repo_are_valid():
    """Every shipped config passes every check; the dataset and weight paths they name are placeholders a user
    points at their own files (load_config checks those, see test_paths_must_exist_where_the_user_names_them)."""
    import yaml

    from deeplab.config import experiment_from_dict

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        experiment_from_dict(yaml.safe_load(f.read_text()), str(f))
    load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")


def test_shorthand_flag_is_the_set_override(tmp_path):
    """A flag alias goes through the --set path: same parsing, same checks, later items win, and --help
    shows the field with its config default."""
    import argparse

    from deeplab.config import Alias, add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, aliases=[Alias("--num-workers", "cluster.num_workers", "workers"),
                                     Alias("--use-gpu", "cluster.use_gpu", "GPUs", switch=True),
                                     Alias("--rates", "model.aspp_rates", "rates", nargs="+")])
    assert "cluster.num_workers; config default: 2" in " ".join(parser.format_help().split())
    args = parser.parse_args(["--set", "cluster.num_workers=3", "--num-workers", "8", "--use-gpu",
                              "--rates", "3", "6"])
    cfg = config_from_args(args)
    assert (cfg.cluster.num_workers, cfg.cluster.use_gpu, cfg.model.aspp_rates) == (8, True, (3, 6))
    with pytest.raises(ConfigError, match="output_stride=12"):
        bad = argparse.ArgumentParser()
        add_config_args(bad, aliases=[Alias("--output-stride", "model.output_stride")])
        config_from_args(bad.parse_args(["--output-stride", "12"]))
    # a base experiment (a checkpoint's own) is kept unless --config replaces it
    base = config_from_args(parser.parse_args(["--set", "train.lr=0.5"]))
    assert config_from_args(parser.parse_args(["--num-workers", "4"]), base=base).train.lr == 0.5


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    from deeplab.fileio import atomic_path, write_text_atomic

    target = tmp_path / "result.json"
    write_text_atomic(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".json" and tmp.parent == tmp_path
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------------------------------------------------
# Every value is checked where the config is built (issue 15): one line naming the field, the value and what is
# allowed; types before values; --set errors name --set, file errors name the file.

DEMO = str(Path(__file__).parents[1] / "configs" / "demo.yaml")


@pytest.mark.parametrize("item,message", [
    ("train.lr=-0.01", "train.lr=-0.01 must be a learning rate > 0, e.g. 0.007"),
    ("train.lr=fast", "train.lr='fast' must be a number"),
    ("model.output_stride=16.0", "model.output_stride=16.0 must be an integer"),
    ("model.aspp_rates=[]", "model.aspp_rates=[] must be one or more atrous rates >= 1, e.g. [6, 12, 18]"),
    ("train.momentum=1.5", "train.momentum=1.5 must be in [0, 1), e.g. 0.9"),
    ("model.multi_grid=[one, two, four]", "model.multi_grid=['one', 'two', 'four'] must be a list of integers"),
    ('train.batch_size="eight"', "train.batch_size='eight' must be an integer"),
    ("train.max_iterations=ten", "train.max_iterations='ten' must be an integer"),
    ("train.weight_decay=-1e-4", "train.weight_decay=-0.0001 must be >= 0, e.g. 0.0001"),
    ("train.eval_interval=0", "train.eval_interval=0 must be >= 1"),
    ("train.amp=fp8", "train.amp='fp8' is unknown; allowed: auto, bf16, fp16, off"),
    ("train.bn_momentum=2", "train.bn_momentum=2 must be in (0, 1]"),
    ("train.freeze_bn=maybe", "train.freeze_bn='maybe' must be true or false"),
    ("data.crop_size=0", "data.crop_size=0 must be >= 1"),
    ("data.scale_max=0.25", "data.scale_min=0.75, data.scale_max=0.25: need 0 < scale_min <= scale_max"),
    ("data.dataset=coco", "data.dataset='coco' is unknown; allowed: synthetic, voc, cityscapes, ade20k, folder"),
    ("data.synthetic_classes=20", "data.synthetic_classes=20 must be 2-12 (background + shapes)"),
    ("data.loader_workers=-1", "data.loader_workers=-1 must be >= 0"),
    ("cluster.num_workers=0", "cluster.num_workers=0 must be >= 1"),
    ("cluster.cpus_per_worker=0", "cluster.cpus_per_worker=0 must be > 0"),
    ("cluster.placement_strategy=EVERYWHERE", "cluster.placement_strategy='EVERYWHERE' is unknown; allowed: PACK"),
    ("tune.reduction_factor=1", "tune.reduction_factor=1 must be >= 2"),
    ("tune.scheduler=hyperband", "tune.scheduler='hyperband' is unknown; allowed: asha, fifo"),
    ("tune.max_concurrent=0", "tune.max_concurrent=0 must be >= 1"),
    ("export.precision=int4", "export.precision='int4' is unknown; allowed: fp32, fp16, bf16, int8"),
    ("export.max_shape=4x3x1025", "export.max_shape='4x3x1025' must be 4 positive sizes NxCxHxW"),
    ("export.min_shape=1x3x600x600", "export.min_shape/opt_shape/max_shape: H must satisfy min <= opt <= max, "
                                     "got 600, 513, 1025"),
])
def test_a_bad_value_is_one_line_naming_the_set_item_and_field(item, message):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [item])
    text = str(info.value)
    assert text.startswith(f"--set {item}: {message}") and "\n" not in text, text


def test_types_from_yaml_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  multi_grid: [one, two, four]\n")
    with pytest.raises(ConfigError, match=r"^.*bad\.yaml: model\.multi_grid=\['one', 'two', 'four'\] must be a list "
                                          r"of integers$"):
        load_config(p)
    p.write_text("train:\n  batch_size: \"eight\"\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: train\.batch_size='eight' must be an integer$"):
        load_config(p)
    p.write_text("train:\n  lr: 1e-3\n  weight_decay: 4e-5\n  amp: off\n")  # YAML 1.1 reads 1e-3 as text
    cfg = load_config(p)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.amp) == (0.001, 4e-5, "off")


def test_set_errors_name_the_set_item_not_the_file(tmp_path):
    p = tmp_path / "base.yaml"
    p.write_text("train:\n  lr: 0.01\n")
    with pytest.raises(ConfigError) as info:
        load_config(p, ["train.momentum=1.5"])
    assert str(info.value).startswith("--set train.momentum=1.5: ") and "base.yaml" not in str(info.value)
    p.write_text("train:\n  momentum: 1.5\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: train\.momentum=1\.5"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"^--set model\.backbon=x: model has no field 'backbon'"):
        load_config(None, ["model.backbon=x"])


def test_checks_across_sections_name_what_the_user_wrote():
    import argparse

    from deeplab.config import Alias, add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, aliases=[Alias("--num-workers", "cluster.num_workers")])
    # demo: global batch 8; over 3 workers 3, 3, 2 images; over 8 one each (BatchNorm synchronized over the 8)
    assert config_from_args(parser.parse_args(["--config", DEMO, "--num-workers", "3"])).cluster.num_workers == 3
    assert config_from_args(parser.parse_args(["--config", DEMO, "--num-workers", "8"])).cluster.num_workers == 8
    with pytest.raises(ConfigError) as info:
        config_from_args(parser.parse_args(["--config", DEMO, "--num-workers", "9"]))
    assert str(info.value).startswith("--num-workers 9: train.batch_size=8 is the global batch: fewer images than "
                                      "the 9 workers")
    with pytest.raises(ConfigError, match=r"^--set train\.batch_size=1, --num-workers 1: .*1 image per worker"):
        config_from_args(parser.parse_args(["--config", DEMO, "--num-workers", "1", "--set", "train.batch_size=1"]))
    with pytest.raises(ConfigError, match=r"^--set train\.amp=fp16: train\.amp='fp16' needs GPUs"):
        load_config(DEMO, ["train.amp=fp16"])
    assert load_config(DEMO, ["train.amp=fp16", "cluster.use_gpu=true"]).train.amp == "fp16"


def test_asha_grace_period_against_the_evaluations_of_a_trial():
    """configs/search_demo.yaml with --max-iterations 32: 2 evaluations per trial, ASHA grace period 3."""
    search = str(Path(DEMO).parent / "search_demo.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(search, ["tune.max_iterations=32"])
    assert str(info.value) == ("--set tune.max_iterations=32: tune.grace_period=3 is more than the 2 evaluation(s) "
                               "per trial (32 iterations, train.eval_interval 16): lower tune.grace_period to <= 2 "
                               "or run more iterations per trial")
    assert load_config(search, ["tune.max_iterations=32", "tune.scheduler=fifo"]).tune.max_iterations == 32
    assert load_config(search, ["tune.max_iterations=48"]).tune.grace_period == 3


def test_changed_fields_are_checked_again_by_check():
    cfg = load_config(DEMO)
    cfg.train.lr = -1
    with pytest.raises(ConfigError, match=r"^train\.lr=-1 must be"):
        cfg.check()
    cfg.train.lr, cfg.cluster.num_workers = 0.01, 9
    with pytest.raises(ConfigError, match="fewer images than the 9 workers"):
        cfg.check()


def test_paths_must_exist_where_the_user_names_them(tmp_path):
    (tmp_path / "notes.txt").write_text("not weights")
    cases = {f"train.init_from={tmp_path / 'missing.ckpt'}": "no such file",
             f"train.pretrained_backbone={tmp_path / 'notes.txt'}": "is not a PyTorch weights file",
             f"train.init_from={tmp_path}": "is a folder, not a weights file"}
    for item, problem in cases.items():
        with pytest.raises(ConfigError) as info:
            load_config(DEMO, [item])
        assert str(info.value) == f"--set {item}: {item}: {problem}" + (
            " (torch.save / .pth / .ckpt)" if "PyTorch" in problem else "")
    with pytest.raises(ConfigError, match=r"data\.root=.*nope: dataset folder not found"):
        load_config(DEMO, ["data.dataset=voc", f"data.root={tmp_path / 'nope'}"])
    assert load_config(DEMO, [f"data.root={tmp_path / 'nope'}"]).data.root  # synthetic data reads no folder
    remote = load_config(DEMO, ["train.init_from=s3://bucket/stage1.ckpt", "data.dataset=voc",
                                "data.root=gs://bucket/voc"])  # remote: the workers read them
    assert remote.train.init_from == "s3://bucket/stage1.ckpt"


def test_a_checkpoints_experiment_loads_where_its_paths_do_not_exist(tmp_path, tiny_model_config):
    """predict/evaluate/export of a checkpoint trained on another machine: its own data.root and init_from are
    not checked; a path the user gives on top of it is."""
    import argparse

    from deeplab import build_model, load_checkpoint, save_checkpoint
    from deeplab.config import ExperimentConfig, add_config_args, config_from_args, experiment_from_dict

    exp = experiment_from_dict({"data": {"dataset": "voc", "root": "/data/elsewhere/VOC2012"},
                                "train": {"init_from": "/runs/elsewhere/stage1.ckpt"}})
    exp = ExperimentConfig(**{**exp.__dict__, "model": tiny_model_config})
    save_checkpoint(tmp_path / "m.ckpt", build_model(tiny_model_config), exp)
    ck = load_checkpoint(tmp_path / "m.ckpt")
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    assert config_from_args(parser.parse_args([]), base=ck.experiment).data.root == "/data/elsewhere/VOC2012"
    with pytest.raises(ConfigError, match=r"^--set data\.root=/nope/voc: data\.root=/nope/voc: dataset folder"):
        config_from_args(parser.parse_args(["--set", "data.root=/nope/voc"]), base=ck.experiment)


def test_cluster_train_refuses_a_bad_config_in_one_line_before_ray_starts(tmp_path):
    """`--set train.lr=-1` used to start Ray and fail in every worker, 83 lines. Ray writes its session folder
    under RAY_TMPDIR when it starts: that folder stays empty."""
    import os
    import subprocess
    import sys

    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "cluster.train", "--config", "configs/demo.yaml", "--set",
                           "train.lr=-1", "--storage-path", str(tmp_path / "runs")], cwd=Path(DEMO).parents[1],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "error: --set train.lr=-1: train.lr=-1 must be a learning rate > 0, e.g. 0.007\n"
    assert list(ray_tmp.iterdir()) == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_search_refuses_a_grace_period_beyond_its_evaluations_dry_run_too(tmp_path, capsys, dry_run):
    from tuning.search_rates import main

    search = str(Path(DEMO).parent / "search_demo.yaml")
    code = main(["--config", search, "--max-iterations", "32", "--storage-path", str(tmp_path), *dry_run])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "tune.grace_period=3 is more than the 2 evaluation(s)" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["deeplab.evaluate", "deeplab.predict", "deeplab.import_torchvision",
                                     "deeplab.data"])
def test_every_deeplab_command_answers_a_config_error_with_exit_2(command, tmp_path, capsys, tiny_model_config):
    import importlib

    from deeplab import build_model, save_checkpoint

    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, build_model(tiny_model_config), tiny_model_config)
    argv = {"deeplab.evaluate": [str(ckpt)], "deeplab.predict": [str(ckpt), str(ckpt), "-o", str(tmp_path / "o")],
            "deeplab.import_torchvision": [str(ckpt), "-o", str(tmp_path / "x.ckpt")],
            "deeplab.data": ["check", "--format", "voc", "--root", str(tmp_path)]}[command]
    module = importlib.import_module(command if command != "deeplab.data" else "deeplab.data.__main__")
    assert module.main([*argv, "--set", "train.momentum=1.5"]) == 2
    assert capsys.readouterr().err == ("error: --set train.momentum=1.5: train.momentum=1.5 must be in [0, 1), "
                                       "e.g. 0.9\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]


def test_num_workers_is_a_count_or_an_elastic_range():
    """--num-workers MIN-MAX, or [MIN, MAX] in YAML: elastic; a batch that cannot be split over MAX is refused."""
    import argparse

    from deeplab.config import Alias, add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, aliases=[Alias("--num-workers", "cluster.num_workers")])
    cfg = config_from_args(parser.parse_args(["--config", DEMO, "--num-workers", "2-4"]))  # batch 8: 2 each at 4
    assert (cfg.cluster.num_workers, cfg.cluster.min_workers, cfg.cluster.max_workers) == ((2, 4), 2, 4)
    assert load_config(DEMO, ["cluster.num_workers=[2, 3]"]).cluster.num_workers == (2, 3)
    assert load_config(DEMO, ["cluster.num_workers=[3, 3]"]).cluster.num_workers == 3  # a fixed group
    again = experiment_from_dict(cfg.to_dict())  # through YAML and checkpoints as a list
    assert cfg.to_dict()["cluster"]["num_workers"] == [2, 4] and again.cluster.num_workers == (2, 4)
    for value, problem in (("3-2", "MIN <= MAX"), ("0-2", "must be >= 1"), ("2-x", "must be an integer or a list"),
                           ("[1, 2, 3]", "a list of 2 integers")):
        with pytest.raises(ConfigError, match=problem):
            load_config(DEMO, [f"cluster.num_workers={value}"])
    with pytest.raises(ConfigError, match="fewer images than the 9 workers"):
        load_config(DEMO, ["cluster.num_workers=2-9"])  # the global batch 8 cannot be split over 9
    with pytest.raises(ConfigError, match="with one worker"):
        load_config(DEMO, ["cluster.num_workers=1-4", "train.batch_size=1"])  # a group of 1 would see 1 image


# ---------------------------------------------------------------------------------------------------------
# Sections declared by the packages that own them, registered with deeplab's config on import

REPO = Path(__file__).parents[1]


def test_full_experiment_round_trip_through_every_packages_section(tmp_path):
    """One file: deeplab's sections and every upper package's load, take --set items into any of them, save
    whole and reload equal; each section is its package's class."""
    from cluster.config import ClusterConfig, ServeConfig
    from export.config import ExportConfig
    from tuning.config import TuneConfig

    cfg = load_config(REPO / "configs" / "search_demo.yaml",
                      ["cluster.num_workers=3", "tune.grace_period=2", "export.precision=fp16", "serve.port=9000",
                       "inference.flip=true"])
    got = (cfg.cluster.num_workers, cfg.tune.grace_period, cfg.export.precision, cfg.serve.port)
    assert got == (3, 2, "fp16", 9000)
    assert isinstance(cfg.cluster, ClusterConfig) and isinstance(cfg.tune, TuneConfig)
    assert isinstance(cfg.export, ExportConfig) and isinstance(cfg.serve, ServeConfig) and cfg.inference.flip
    out = tmp_path / "saved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    import yaml

    assert set(yaml.safe_load(out.read_text())) == {"model", "data", "train", "inference", "cluster", "tune",
                                                    "export", "segment", "serve"}


def test_a_set_into_an_upper_section_names_the_item():
    with pytest.raises(ConfigError, match=r"^--set cluster.num_wrkers=2: cluster has no field 'num_wrkers'"):
        load_config(None, ["cluster.num_wrkers=2"])


def test_files_written_before_the_inference_section_still_load():
    """segment/serve's output_stride and segment's alpha became inference fields: an old experiment (a
    checkpoint's, a config) loads with them moved there, and a value written at the new place wins."""
    old = {"segment": {"output_stride": 8, "alpha": 0.25, "batch_size": 2}, "serve": {"output_stride": None}}
    cfg = experiment_from_dict(old)
    assert (cfg.inference.output_stride, cfg.inference.alpha, cfg.segment.batch_size) == (8, 0.25, 2)
    assert "output_stride" not in cfg.to_dict()["segment"]
    newer = experiment_from_dict({**old, "inference": {"output_stride": 16}})
    assert newer.inference.output_stride == 16


def test_output_stride_is_one_check_with_the_models_strides():
    """model, inference and export strides take the model's own allowed values (4-256, Table 1), in one
    message; a value the model cannot reach is refused where the model is switched to it."""
    from export.config import ExportConfig

    for key in ("model.output_stride", "inference.output_stride", "export.output_stride"):
        with pytest.raises(ConfigError, match=rf"^--set {key}=12: {key}=12 is not allowed; use one of 4, 8, 16, 32"):
            load_config(None, [f"{key}=12"])
    assert ExportConfig(output_stride=4).output_stride == 4
    assert load_config(None, ["inference.output_stride=64"]).inference.output_stride == 64


def _run_python(code: str, cwd) -> str:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_deeplab_alone_keeps_the_sections_it_does_not_know_and_saves_them_whole(tmp_path):
    """A process importing deeplab only reads a full experiment: sections of packages it did not import are
    kept as written and saved back whole; a --set into one of them is one line naming the item."""
    out = _run_python(
        "import sys, deeplab.config as c\n"
        f"cfg = c.load_config({str(REPO / 'configs' / 'search_demo.yaml')!r}, ['model.output_stride=8'])\n"
        "assert sorted(c.SECTION_CLASSES) == ['data', 'inference', 'model', 'train'], c.SECTION_CLASSES\n"
        f"c.save_config(cfg, {str(tmp_path / 'saved.yaml')!r})\n"
        "try:\n    c.load_config(None, ['cluster.num_workers=2'])\nexcept c.ConfigError as e:\n    print(e)\n",
        REPO)
    assert out.startswith("--set cluster.num_workers=2: expected SECTION.FIELD=VALUE with SECTION one of model, data")
    import yaml

    saved, original = yaml.safe_load((tmp_path / "saved.yaml").read_text()), yaml.safe_load(
        (REPO / "configs" / "search_demo.yaml").read_text())
    assert saved["cluster"] == original["cluster"] and saved["tune"] == original["tune"]
    assert saved["model"]["output_stride"] == 8
    full = load_config(tmp_path / "saved.yaml")  # with every package imported: all of it checked and equal
    assert full == load_config(REPO / "configs" / "search_demo.yaml", ["model.output_stride=8"])


def test_a_deeplab_command_reads_a_full_experiment_config(tmp_path, tiny_model_config):
    """python -m deeplab.evaluate --config with cluster/tune/export/segment/serve sections (deeplab imports
    none of their packages): it evaluates, with the file's inference section."""
    import json

    import yaml

    from deeplab import build_model, save_checkpoint

    full = yaml.safe_load((REPO / "configs" / "search_demo.yaml").read_text())
    full["model"] = {"backbone": "resnet_tiny", "num_classes": 5, "aspp_channels": 16}
    full["data"].update(synthetic_classes=5, synthetic_val=1, synthetic_size=33, val_size=None)
    full.update(inference={"flip": True}, export={"precision": "fp16"}, serve={"port": 9000})
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full))
    save_checkpoint(tmp_path / "m.ckpt", build_model(tiny_model_config), tiny_model_config)
    out = _run_python(
        "import sys; from deeplab.evaluate import main\n"
        f"code = main([{str(tmp_path / 'm.ckpt')!r}, '--config', {str(tmp_path / 'full.yaml')!r}, '-o', "
        f"{str(tmp_path / 'r.json')!r}])\n"
        "assert 'cluster' not in sys.modules and 'tuning' not in sys.modules, 'deeplab imported an upper package'\n"
        "print(code)\n", REPO)
    assert out.strip().endswith("0")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["flip"] is True and result["images"] == 1
