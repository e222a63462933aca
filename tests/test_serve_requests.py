"""cluster.serve without Ray: how a request body becomes image bytes (raw, multipart, refused types), how the
flags become Serve's deployment options, and the command line's one-line errors (exit 2 before Ray starts)."""
import pytest

from cluster import serve
from cluster.config import ServeConfig
from cluster.serve import Problem, deployment_options, upload_bytes


def form(*parts, boundary="XyZ123"):
    body = b""
    for disposition, data in parts:
        body += f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_raw_bodies_pass_through_for_image_and_octet_stream_types():
    for ctype in ("image/jpeg", "image/png; charset=binary", "application/octet-stream", ""):
        assert upload_bytes(ctype, b"\x89PNG...") == b"\x89PNG..."


def test_multipart_takes_the_file_field_whatever_else_the_form_holds():
    image = bytes(range(256)) * 3  # binary, CR/LF bytes included
    body, ctype = form(('name="note"', b"hello"), ('name="upload"; filename="a.jpg"', image))
    assert upload_bytes(ctype, body) == image
    body, ctype = form(('name="image"', b"raw field"))
    assert upload_bytes(ctype, body) == b"raw field"


@pytest.mark.parametrize("ctype, body, status, needle", [
    ("text/plain", b"abc", 415, "content type text/plain"),
    ("application/x-www-form-urlencoded", b"a=b", 415, "curl --data-binary"),
    ("image/jpeg", b"", 400, "empty upload"),
    ("multipart/form-data", b"--x\r\n", 400, "without a boundary"),
    (form(('name="note"', b"hi"))[1], form(('name="note"', b"hi"))[0], 400, "no file field"),
])
def test_bodies_that_cannot_carry_an_image_are_refused_with_a_status_and_one_line(ctype, body, status, needle):
    with pytest.raises(Problem) as e:
        upload_bytes(ctype, body)
    assert e.value.status == status and needle in e.value.reason and "\n" not in e.value.reason


def test_replicas_or_autoscaling_from_the_flags():
    fixed = deployment_options(ServeConfig(replicas=3, cpus_per_replica=2, gpus_per_replica=1, max_batch_size=4))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1} and fixed["max_ongoing_requests"] == 8
    scaled = deployment_options(ServeConfig(autoscale=[1, 4], max_batch_size=16))
    assert "num_replicas" not in scaled and scaled["max_ongoing_requests"] == 32
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}


def test_only_a_loopback_endpoint_counts_as_loopback_for_the_ingress_choice():
    for host in ("127.0.0.1", "127.0.1.1", "::1", "[::1]", "localhost"):
        assert serve.is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.0.2.2", "head.example", ""):
        assert not serve.is_loopback(host), host


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "missing.onnx: no such model file"),
    (["MODEL", "--autoscale", "3", "1"], "serve.autoscale=[3, 1]"),
    (["MODEL", "--replicas", "0"], "serve.replicas=0 must be >= 1"),
    (["MODEL", "--port", "70000"], "serve.port=70000"),
    (["MODEL", "--ingress", "nginx"], "serve.ingress='nginx' is unknown; allowed: auto, haproxy, proxy"),
    (["MODEL", "--max-batch-size", "0"], "serve.max_batch_size=0"),
    (["MODEL", "--max-batch-size", "eight"], "serve.max_batch_size='eight' must be an integer"),
    (["MODEL", "--replicas", "2", "--autoscale", "1", "3"], "set one"),
    (["MODEL", "--output-stride", "12"], "--output-stride 12: inference.output_stride=12 is not allowed"),
])
def test_command_line_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch, args, message):
    from inference_files import tiny_checkpoint

    monkeypatch.chdir(tmp_path)
    tiny_checkpoint(tmp_path / "m.ckpt")
    assert serve.main(["m.ckpt" if a == "MODEL" else a for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_autoscale_flag_becomes_the_config_field():
    from deeplab.config import config_from_args

    cfg = config_from_args(serve.parse_args(["m.ckpt", "--autoscale", "1", "3", "--max-batch-size", "4"])).serve
    assert (cfg.autoscale, cfg.replicas, cfg.max_batch_size) == ((1, 3), 1, 4)


@pytest.mark.parametrize("method,path,fmt,status", [
    ("POST", "/segment/", "png", None), ("GET", "/info", "png", None), ("GET", "/healthz", "json", None),
    ("GET", "/segment", "png", 405), ("POST", "/info", "png", 405), ("POST", "/predict", "png", 404),
    ("POST", "/segment", "xml", 400),
])
def test_routing_without_ray(method, path, fmt, status):
    if status is None:
        assert serve.route(method, path, fmt) == path.rstrip("/")
    else:
        with pytest.raises(Problem) as info:
            serve.route(method, path, fmt)
        assert info.value.status == status and "\n" not in info.value.reason
