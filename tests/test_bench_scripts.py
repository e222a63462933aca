"""deeplab's benchmark scripts run end to end on tiny sizes and print their figures (no timing asserted)."""
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bench_model_prints_both_strides(capsys):
    from deeplab.bench_model import main

    assert main(["--backbone", "resnet_tiny", "--size", "33", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[-2:]] == [["resnet_tiny", "OS16"], ["resnet_tiny", "OS8"]]
    assert main(["--size", "0"]) == 2
    assert capsys.readouterr().err == "error: --size 0: must be >= 1 (the square input side in pixels)\n"


def test_data_bench_prints_every_figure(capsys):
    from deeplab.data.bench import main

    assert main(["--images", "2", "--rounds", "1", "--crop", "33", "--synthetic-sizes", "33"]) == 0
    out = capsys.readouterr().out
    for needle in ("decode only", "decode + augment to 33x33 crops", "decode + normalize", "synthetic 33x33"):
        assert needle in out
