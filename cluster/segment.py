"""python -m cluster.segment MODEL INPUT -o OUTPUT [--workers N] [--color]

Segment a whole image collection on a Ray cluster with Ray Data: the files are read through pyarrow's
filesystems and decoded in parallel tasks, then a pool of model actors (map_batches with a callable class)
runs the model on batches of same-size images. MODEL is a checkpoint (.ckpt), an ONNX file (FP32, FP16 or
INT8 Q/DQ), an OpenVINO IR (.xml + .bin) or a TensorRT engine (+ its sidecar); every file of it is shipped to
the nodes, and classes, output stride and mean/std come from the file itself. A one-file MODEL may be an
object-store URL (the ``s3://.../best.ckpt`` cluster.train prints): the driver fetches it first. INPUT is a
folder (recursive), a text file listing paths (one a line, relative to the list's folder or absolute), or
an object-store prefix such as s3://bucket/photos/.

For every image OUTPUT gets NAME.png (class ids) and, with --color, NAME_color.png and NAME_overlay.png,
at the image's relative path, plus manifest.jsonl (one JSON line per image: path, size, seconds, pixels per
class, or the reason it failed) and model.json (the model, by content hash). OUTPUT is a folder (on a multi-node
cluster one every node mounts at the same path) or an object-store prefix (s3://bucket/masks, gs://...) that
the model actors write to with their node's credentials; there the manifest's records go to part objects
(manifest.parts/) as they arrive, merged into manifest.jsonl at the end or at a stop. Running the same command again
skips images already done; with another model it stops before any work unless --overwrite (which redoes
every image). A killed actor is replaced and its images redone, each output written once. Unreadable files are
listed as failed and the run goes on; it exits 1 at the end if any failed (2 for a bad command line, model or input).
"""
from __future__ import annotations

import sys
import time

from cluster.console import ACTOR_ARGUMENTS_NOISE, quiet_ray_data, quiet_stderr, ray_init_options
from cluster.infer import CHECKPOINT_STRIDE_ALIAS, fetch_model, model_parser
from cluster.ray_session import init_ray
from cluster.segment_inputs import list_inputs
from cluster.segment_outputs import MANIFEST, Output, claim_output, open_manifest
from cluster.segment_pipeline import segment, startup_line, stop_actors
from deeplab.cli import command, on_interrupt
from deeplab.config import ALPHA_ALIAS, Alias, add_config_args, config_from_args
from deeplab.fileio import is_uri
from export.model_file import open_model_file

ALIASES = [
    Alias("--workers", "segment.workers", "model actors (default: as many as the cluster's CPUs, or GPUs, hold)"),
    Alias("--batch-size", "segment.batch_size", "images per actor call"),
    Alias("--cpus-per-worker", "segment.cpus_per_worker", "CPUs (and intra-op threads) per model actor"),
    Alias("--num-gpus-per-worker", "segment.gpus_per_worker", "GPUs per model actor (0: run on CPU)"),
    CHECKPOINT_STRIDE_ALIAS,
    Alias("--color", "segment.color", "also write NAME_color.png (palette) and NAME_overlay.png", switch=True),
    ALPHA_ALIAS,
    Alias("--max-pixels", "segment.max_pixels", "images with more pixels fail (default: Pillow's bomb limit)"),
]


def parse_args(argv):
    p = model_parser("python -m cluster.segment", __doc__)
    p.add_argument("input", metavar="INPUT", help="a folder, a text file listing paths, one image, or "
                   "s3://bucket/prefix/")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT",
                   help="folder for the PNGs and manifest.jsonl (on a multi-node cluster: a folder every node "
                        "mounts at the same path), or an object-store prefix such as s3://bucket/masks (credentials "
                        "from each node's environment)")
    p.add_argument("--extensions", help="only files with these suffixes in a folder or prefix, e.g. jpg,png "
                   "(default: every file; a file that is not an image is listed as failed)")
    p.add_argument("--overwrite", action="store_true",
                   help="OUTPUT holds another model's results: remove them and segment every image with MODEL "
                        "(without it, such a run stops before any work)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's and Ray Data's own INFO lines too (always in Ray's session logs)")
    add_config_args(p, aliases=ALIASES)
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)

    exp = config_from_args(args)
    cfg = exp.segment
    output = Output(args.output)
    if is_uri(args.model):  # the driver fetches it once, then ships it to the nodes as any local model
        print(f"fetching {args.model}", flush=True)
        args.model = fetch_model(args.model)
    phases, clock = {}, time.perf_counter()
    model = open_model_file(args.model, exp.inference.output_stride)  # read once: claimed, shipped, shown
    info = model.info
    phases["model info"], clock = time.perf_counter() - clock, time.perf_counter()
    on_interrupt(f"{output} is as it was (nothing segmented by this run yet); the same command starts again")
    extensions = [e.strip() for e in args.extensions.split(",") if e.strip()] if args.extensions else None
    same_store = not output.local and args.input.split("://", 1)[0] == output.folder.scheme
    inputs = list_inputs(args.input, exclude=output.path if output.local or same_store else None,
                         extensions=extensions)
    phases["listing"] = time.perf_counter() - clock
    print(f"model: {args.model} ({info.backend.split(' ')[0]}, {info.precision}, {info.num_classes} classes, "
          f"output stride {info.output_stride})", flush=True)
    if output.exists():  # another model's OUTPUT stops here, before Ray starts
        claim_output(output, model, inputs.items, open_manifest(output), args.overwrite)

    clock = time.perf_counter()
    init_ray(exp, **ray_init_options(args.verbose))
    phases["Ray start"] = time.perf_counter() - clock
    quiet_ray_data(args.verbose)
    try:
        with quiet_stderr(ACTOR_ARGUMENTS_NOISE, args.verbose):
            summary = segment(model, inputs, output, cfg, log=lambda m: print(m, flush=True),
                              overwrite=args.overwrite, inference=exp.inference)
    except KeyboardInterrupt:
        stop_actors(output)
        raise
    done = summary.ok + summary.failed
    manifest = output.url_of(MANIFEST)
    print(f"segmented {done} images in {summary.seconds:.1f}s: {summary.images_per_s:.2f} images/s "
          f"({summary.ok} ok, {summary.failed} failed, {summary.skipped} already done); manifest: {manifest}",
          flush=True)
    if summary.first_count:
        print(startup_line({**phases, **summary.startup}) + f"; then {summary.steady_images_per_s:.2f} images/s",
              flush=True)
    if summary.failed:
        for reason in summary.failures[:5]:
            print(f"  failed: {reason}", file=sys.stderr)
        print(f"error: {summary.failed} of {done} images failed (reasons in {manifest})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
