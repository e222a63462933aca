"""The dataset layouts deeplab reads (``data.dataset``, ``--format``): the one list every check and command
line takes its choices from; `deeplab.data.datasets` implements each."""
DATASETS = ("synthetic", "voc", "cityscapes", "ade20k", "folder")
