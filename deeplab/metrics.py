"""Confusion-matrix metrics for semantic segmentation (rows: ground truth, columns: prediction)."""
from __future__ import annotations

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """Accumulates a num_classes x num_classes count matrix; pixels labelled ``ignore_index`` are skipped.

    In distributed evaluation each worker updates with its shard, then ``all_reduce()`` sums the matrices,
    so every worker holds the metric of the whole set.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.mat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred`` and ``target``: class ids of the same shape (any batch layout), on any device."""
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMatrix.update: prediction {tuple(pred.shape)} and target "
                             f"{tuple(target.shape)} differ in shape")
        n = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long()
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n):
            raise ValueError(f"ConfusionMatrix.update: target holds labels outside 0..{n - 1} and "
                             f"{self.ignore_index}")
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= n):
            raise ValueError(f"ConfusionMatrix.update: prediction holds labels outside 0..{n - 1}")
        counts = torch.bincount(target * n + pred, minlength=n * n)
        self.mat += counts.reshape(n, n).to(self.mat.device)

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum over all workers when torch.distributed is initialized (no-op otherwise)."""
        if dist.is_available() and dist.is_initialized():
            mat = self.mat
            if dist.get_backend() == "nccl":
                mat = mat.cuda()
            dist.all_reduce(mat, op=dist.ReduceOp.SUM)
            self.mat = mat.to(self.mat.device)
        return self

    def iou(self) -> torch.Tensor:
        """Per-class intersection over union (float64); NaN for classes absent from both GT and prediction."""
        m = self.mat.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))

    def miou(self) -> float:
        """Mean IoU over classes present in the ground truth or the predictions (NaN if no pixel counted)."""
        return float(torch.nanmean(self.iou())) if self.mat.sum() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.mat.sum()
        return float(self.mat.diag().sum().double() / total) if total else float("nan")

    def to_dict(self, class_names=None) -> dict:
        """Plain numbers for JSON: mIoU, pixel accuracy, per-class IoU (None where absent)."""
        names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        iou = self.iou().tolist()
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "pixels": int(self.mat.sum()),
            "iou": {name: (None if v != v else v) for name, v in zip(names, iou)},
        }
