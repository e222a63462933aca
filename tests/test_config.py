"""One config system: YAML files, --set overrides, one-line errors naming the field."""
import pytest

from deeplab.config import ConfigError, load_config, save_config


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
    ("model:\n  output_stride: 4\n", "output_stride=4"),
    ("model: [1, 2\n", "not valid YAML"),
])
def test_bad_config_names_file_and_field(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
        load_config(None, ["output_stride=8"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_configs_in_repo_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    for f in files:
        if f.name.startswith("search_"):
            continue  # search spaces, not experiment files
        load_config(f)


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
    args = parser.parse_args(["--set", "cluster.num_workers=3", "--num-workers", "4", "--use-gpu",
                              "--rates", "3", "6"])
    cfg = config_from_args(args)
    assert (cfg.cluster.num_workers, cfg.cluster.use_gpu, cfg.model.aspp_rates) == (4, True, (3, 6))
    with pytest.raises(ConfigError, match="output_stride=4"):
        bad = argparse.ArgumentParser()
        add_config_args(bad, aliases=[Alias("--output-stride", "model.output_stride")])
        config_from_args(bad.parse_args(["--output-stride", "4"]))
    # a base experiment (a checkpoint's own) is kept unless --config replaces it
    base = config_from_args(parser.parse_args(["--set", "train.lr=0.5"]))
    assert config_from_args(parser.parse_args(["--num-workers", "5"]), base=base).train.lr == 0.5


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
