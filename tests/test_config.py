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
