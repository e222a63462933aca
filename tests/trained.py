"""A tiny model trained for a few seconds on synthetic data, for tests whose subject is accuracy (INT8 gates,
exported models evaluated like their checkpoint): untrained weights would give mIoU values that are noise."""
import torch

from deeplab import build_model
from deeplab.config import DataConfig, ExperimentConfig, ModelConfig
from deeplab.data import build_dataset


def train_tiny(epochs: int = 8) -> tuple:
    """resnet_tiny on 4-class synthetic 49x49 images, plain SGD; returns (model in eval mode, experiment)."""
    torch.manual_seed(0)
    cfg = ExperimentConfig(model=ModelConfig(backbone="resnet_tiny", num_classes=4, aspp_channels=16),
                           data=DataConfig(synthetic_size=49, synthetic_train=64, synthetic_val=8, synthetic_classes=4,
                                           crop_size=49, scale_min=1.0, scale_max=1.0, loader_workers=0))
    model = build_model(cfg.model)
    loader = torch.utils.data.DataLoader(build_dataset(cfg.data, "train", train=True), batch_size=8, shuffle=True,
                                         drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y, ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), cfg
