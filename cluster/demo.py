"""The main job on the embedded default (``make demo``): train, evaluate at output stride 8, export, bench.

1. local Ray, 2 CPU workers, DDP with synchronized BatchNorm, synthetic scenes: ResNet-50 DeepLabv3
   trained from scratch with `cluster.train` (configs/demo.yaml) -> runs/demo/best.ckpt
2. the best checkpoint evaluated on the validation set at output stride 16 (as trained) and 8 (paper: run at 8),
   and a picture of what it learned: 4 validation images, each as image | ground truth | prediction at output
   stride 8 (in the dataset's palette) -> runs/demo/predictions_os8.png, named on the console's last line
3. if the export package is installed: ONNX at output stride 8 (checked against PyTorch in onnxruntime) and a
   short benchmark of the backends it finds

    python -m cluster.demo [--config configs/demo.yaml] [--set SECTION.FIELD=VALUE ...] [--resume]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

from cluster.console import ray_init_options
from cluster.ray_session import init_ray
from cluster.storage import resolve_storage_path
from cluster.train import stop_note, train
from deeplab.cli import command, on_interrupt
from deeplab.config import add_config_args, config_from_args
from export.cli import show_progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PICTURE = "predictions_os8.png"  # in the run folder: what the demo learned, named on the console's last line


def evaluate_checkpoint(path: str, output_strides=(16, 8)) -> dict:
    """mIoU of a checkpoint on its own experiment's validation set at each output stride."""
    from torch.utils.data import DataLoader

    from deeplab import load_checkpoint
    from deeplab.data import build_dataset
    from deeplab.inference import evaluate, model_predictor

    ck = load_checkpoint(path)
    loader = DataLoader(build_dataset(ck.experiment.data, ck.experiment.data.val_split, train=False), batch_size=1)
    return {os_: evaluate(model_predictor(ck.model, output_stride=os_), loader, ck.config.num_classes).miou()
            for os_ in output_strides}


def write_picture(path: str, output: str, count: int = 4, scale: int = 2) -> str:
    """image | ground truth | prediction at output stride 8 for the first ``count`` validation images of the
    checkpoint's experiment, in its dataset's palette, as one PNG (panels enlarged ``scale`` times)."""
    from deeplab import load_checkpoint
    from deeplab.data import build_dataset, dataset_info
    from deeplab.visualize import validation_grid, write_png

    ck = load_checkpoint(path)
    data = ck.experiment.data
    info = dataset_info(data)
    grid = validation_grid(ck.model, build_dataset(data, data.val_split, train=False), info.palette, count=count,
                           output_stride=8, ignore_index=data.ignore_index, scale=scale, names=info.class_names)
    return str(write_png(output, grid))


def export_and_bench(best: str, out: str) -> None:
    """ONNX export and a short benchmark of the trained model."""
    from export.to_onnx import export_checkpoint

    show_progress()
    onnx_path = os.path.join(out, "model_os8.onnx")
    export_checkpoint(best, onnx_path, output_stride=8)
    print(f"wrote {onnx_path}")
    try:
        from export import bench
    except ImportError as e:
        print(f"skipping the benchmark: {e}")
        return
    bench.main(["--checkpoint", best, "--onnx", onnx_path, "--size", "129", "--repeats", "3", "--accuracy-images", "4",
                "--threads", "1", "--backends", "torch_fp32,torch_channels_last,ort_cpu_fp32",
                "--out", os.path.join(out, "bench")])


@command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.set_defaults(config=os.path.join(ROOT, "configs", "demo.yaml"))
    parser.add_argument("--resume", action="store_true",
                        help="continue runs/demo if it exists (default: start it afresh)")
    parser.add_argument("--skip-export", action="store_true", help="stop after training and evaluation")
    parser.add_argument("--verbose", action="store_true", help="Ray's own lines on the console too")
    args = parser.parse_args(argv)
    cfg = config_from_args(args)

    run_dir = os.path.join(resolve_storage_path(cfg.cluster.storage_path), cfg.cluster.name)
    if os.path.isdir(run_dir) and not args.resume:
        print(f"removing the previous demo run {run_dir} (--resume keeps it)")
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    init_ray(cfg, local=True, **ray_init_options(args.verbose))  # the demo's own local Ray, whatever else runs here
    print(f"[1/3] training {cfg.model.backbone} DeepLabv3 on {cfg.cluster.num_workers} CPU workers "
          f"(synchronized BatchNorm), {cfg.train.max_iterations} iterations of batch {cfg.train.batch_size} "
          f"at {cfg.data.crop_size}x{cfg.data.crop_size}", flush=True)
    try:
        train(cfg, verbose=args.verbose)
    except KeyboardInterrupt:  # without --resume, the same command would start afresh
        on_interrupt(stop_note(run_dir, rerun="python -m cluster.demo --resume"))
        raise
    import ray

    ray.shutdown()  # free the cores for evaluation
    trained = time.perf_counter()
    best = os.path.join(run_dir, "best.ckpt")
    on_interrupt(f"training finished, {best} kept; `python -m deeplab.evaluate {best}` evaluates it "
                 "(the same command trains again from the beginning)")

    import torch

    torch.set_num_threads(1)  # small images: one thread avoids OpenMP spin-waits on a busy machine
    print("[2/3] evaluating best.ckpt on the validation set at output stride 16 and 8", flush=True)
    miou = evaluate_checkpoint(best)
    for os_, value in miou.items():
        print(f"  output stride {os_:2d}: val mIoU {value:.4f}")
    picture = write_picture(best, os.path.join(run_dir, PICTURE))
    evaluated = time.perf_counter()

    if args.skip_export:
        print("[3/3] export skipped (--skip-export)")
    else:
        print("[3/3] export to ONNX at output stride 8 and a short benchmark", flush=True)
        export_and_bench(best, os.path.join(run_dir, "export"))
    done = time.perf_counter()
    print(f"\ndemo finished in {(done - started) / 60:.1f} min (training {(trained - started) / 60:.1f}, evaluation "
          f"{(evaluated - trained) / 60:.1f}, export+bench {(done - evaluated) / 60:.1f}); "
          f"val mIoU at output stride 8: {miou[8]:.4f}; best checkpoint {best}")
    print(f"what it learned (image | ground truth | prediction at output stride 8): {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
