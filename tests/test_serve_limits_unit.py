"""cluster.serve's bounds and answers without Ray: the pixel budget per model call (checked against a real
PyTorch runner run one image at a time), the body read deadline (408), the request timeout (504), a 500 that
tells the client a request id and nothing internal while the log gets the details, the new options' one-line
errors, and the console's traffic line."""
import asyncio
import logging
import time

import numpy as np
import pytest

from cluster import serve
from cluster.config import ServeConfig
from cluster.infer import model_calls, predict_labels
from cluster.serve import Problem, as_problem, image_limit, read_body
from cluster.serve_stats import TrafficStats, traffic_line


def test_model_calls_hold_the_pixel_budget_and_never_mix_sizes():
    shapes = [(64, 64, 3)] * 5 + [(32, 32, 3)] * 3 + [(200, 200, 3)]
    calls = model_calls(shapes, max_batch_pixels=2 * 64 * 64)
    assert sorted(i for call in calls for i in call) == list(range(len(shapes)))  # each image once
    for call in calls:
        assert len({shapes[i] for i in call}) == 1  # one size per call
        h, w = shapes[call[0]][:2]
        assert len(call) == 1 or len(call) * h * w <= 2 * 64 * 64
    assert sorted(len(c) for c in calls if shapes[c[0]][0] == 64) == [1, 2, 2]
    assert [len(c) for c in calls if shapes[c[0]][0] == 32] == [3]  # 3 x 1024 pixels fit in 8192
    assert [len(c) for c in calls if shapes[c[0]][0] == 200] == [1]  # over the budget: alone
    assert sorted(map(len, model_calls(shapes))) == [1, 3, 5]  # no budget: one call per size


def test_predict_labels_under_a_budget_equals_one_image_at_a_time(tmp_path):
    from export.model_file import load_runner
    from inference_files import photo, tiny_checkpoint

    runner = load_runner(str(tiny_checkpoint(tmp_path / "tiny.ckpt")))
    images = [photo((40, 48), seed=s) for s in range(5)] + [photo((24, 24), seed=9)]
    calls = []
    runner_labels = runner.labels
    runner.labels = lambda batch: calls.append(len(batch)) or runner_labels(batch)
    budgeted = predict_labels(runner, images, max_batch_pixels=2 * 40 * 48)
    assert sorted(calls) == [1, 1, 2, 2]
    for image, labels in zip(images, budgeted):
        np.testing.assert_array_equal(labels, predict_labels(runner, [image])[0])


def test_the_413_limit_is_the_smaller_of_the_image_limit_and_the_call_budget():
    assert image_limit(ServeConfig(max_pixels=10_000, max_batch_pixels=5_000)) == (5_000, "serve.max_batch_pixels")
    assert image_limit(ServeConfig(max_pixels=10_000, max_batch_pixels=50_000)) == (10_000, "serve.max_pixels")


class SlowRequest:
    """A request whose body arrives one byte per ``delay_s`` (a client dribbling its upload)."""

    def __init__(self, size: int, delay_s: float):
        self.headers, self.size, self.delay_s = {"content-length": str(size)}, size, delay_s

    async def stream(self):
        for _ in range(self.size):
            await asyncio.sleep(self.delay_s)
            yield b"x"


def test_a_body_slower_than_the_read_timeout_is_408_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(Problem) as e:
        asyncio.run(read_body(SlowRequest(1000, 0.2), limit=10_000, timeout_s=0.5))
    assert e.value.status == 408 and "serve.read_timeout_s=0.5" in e.value.reason
    assert time.monotonic() - start < 2
    assert asyncio.run(read_body(SlowRequest(5, 0.01), limit=10_000, timeout_s=5)) == b"xxxxx"  # in time: read


def test_a_timeout_is_504_and_an_internal_error_is_a_generic_500_with_the_request_id(caplog):
    assert as_problem(asyncio.TimeoutError(), 7.5, "r1").status == 504
    assert "serve.request_timeout_s=7.5" in as_problem(asyncio.TimeoutError(), 7.5, "r1").reason
    mine = Problem(413, "too big")
    assert as_problem(mine, 1, "r1") is mine
    try:
        raise RuntimeError("/srv/models/secret.onnx: onnxruntime::Node 42 failed\nmore internals")
    except RuntimeError as e:
        with caplog.at_level(logging.ERROR, logger="ray.serve"):
            problem = as_problem(e, 60, "req-3f2a")
    assert problem.status == 500 and "req-3f2a" in problem.reason and "\n" not in problem.reason
    assert "secret" not in problem.reason and "onnxruntime" not in problem.reason
    logged = [r for r in caplog.records if "req-3f2a" in r.getMessage()]
    assert logged and "/srv/models/secret.onnx" in logged[0].exc_text  # the details, under that id


@pytest.mark.parametrize("args, message", [
    (["MODEL", "--max-queued-requests", "0"], "serve.max_queued_requests=0"),
    (["MODEL", "--max-batch-pixels", "0"], "serve.max_batch_pixels=0"),
    (["MODEL", "--request-timeout-s", "0"], "serve.request_timeout_s=0"),
    (["MODEL", "--read-timeout-s", "-1"], "serve.read_timeout_s=-1"),
    (["MODEL", "--set", "serve.metrics_port=70000"], "serve.metrics_port=70000"),
])
def test_new_options_bad_values_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    from inference_files import tiny_checkpoint

    monkeypatch.chdir(tmp_path)
    tiny_checkpoint(tmp_path / "m.ckpt")
    assert serve.main(["m.ckpt" if a == "MODEL" else a for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_queue_bound_and_retry_after_reach_serves_options():
    options = serve.deployment_options(ServeConfig(max_queued_requests=16, retry_after_s=2))
    assert options["max_queued_requests"] == 16
    assert (options["backpressure_config"].status_code, options["backpressure_config"].retry_after_s) == (503, 2)


def test_traffic_line_summarizes_the_window_and_a_quiet_window_prints_nothing():
    stats = TrafficStats()
    for ms, status in [(100, 200)] * 97 + [(900, 200), (5, 413), (2000, 504)]:
        stats.record(status, ms / 1000)
    for images in (1, 2, 3):
        stats.record_call(images)
    summary = stats.take()
    assert (summary["requests"], summary["4xx"], summary["5xx"], summary["mean_batch"]) == (100, 1, 1, 2.0)
    assert summary["p50_ms"] == pytest.approx(100) and 900 < summary["p99_ms"] < 2000
    line = traffic_line(summary, 60)
    assert "100 requests" in line and "p50 100 ms" in line and "mean batch 2.0" in line and "4xx 1, 5xx 1" in line
    assert traffic_line(stats.take(), 60) is None  # the window was reset


def test_segment_workers_hold_their_pixel_budget(tmp_path):
    """cluster.segment's model actor (called here as Ray Data calls it) splits a batch of same-size images into
    calls of at most segment.max_batch_pixels, and writes every mask."""
    import ray

    from cluster.config import SegmentConfig
    from cluster.infer import ship_model
    from cluster.segment_pipeline import SegmentWorker
    from inference_files import photo, read_png, tiny_checkpoint

    assert SegmentConfig().max_batch_pixels == ServeConfig().max_batch_pixels == 2048 * 2048
    ray.init(address="local", num_cpus=1, include_dashboard=False)  # ship_model puts the files in the object store
    try:
        model = ship_model(tiny_checkpoint(tmp_path / "m.ckpt"))
        worker = SegmentWorker(model, str(tmp_path / "out"), False, 0.5, None, 0, 1, max_batch_pixels=2 * 40 * 48)
    finally:
        ray.shutdown()  # the Ray modules after this one start their own clusters
    calls, labels_of = [], worker.runner.labels
    worker.runner.labels = lambda batch: calls.append(len(batch)) or labels_of(batch)
    images = [photo((40, 48), seed=s) for s in range(5)]
    batch = {"uri": [f"/in/img{i}.png" for i in range(5)], "name": [f"img{i}" for i in range(5)],
             "pixels": [im.tobytes() for im in images], "height": [40] * 5, "width": [48] * 5, "error": [""] * 5,
             "decode_seconds": [0.0] * 5, "path": [f"/in/img{i}.png" for i in range(5)]}
    worker(batch)
    assert sorted(calls) == [1, 2, 2]
    for i, image in enumerate(images):
        alone = predict_labels(worker.runner, [image])[0]
        np.testing.assert_array_equal(read_png(tmp_path / "out" / f"img{i}.png"), alone)


def test_uploads_decode_or_become_413_415_400():
    """What the replica does with upload bytes: an EPS file (which Pillow would render with Ghostscript) is
    415 naming the accepted formats; over the pixel budget 413 naming the option; not an image 400."""
    from cluster.serve import decode_upload
    from inference_files import jpeg_bytes, photo

    cfg = ServeConfig(max_pixels=10_000, max_batch_pixels=5_000)
    assert decode_upload(jpeg_bytes(photo((50, 60), seed=1)), cfg).shape == (50, 60, 3)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"
    cases = [(eps, 415, "not accepted"), (jpeg_bytes(photo((80, 80), seed=2)), 413, "serve.max_batch_pixels"),
             (b"plain words" * 9, 400, "unreadable")]
    for data, status, needle in cases:
        with pytest.raises(Problem) as e:
            decode_upload(data, cfg)
        assert e.value.status == status and needle in e.value.reason and "\n" not in e.value.reason, e.value.reason
