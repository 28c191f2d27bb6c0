"""Your own model in compress: an example file.

Use it wherever compress takes a model name:

    compress train   --arch examples/my_model.py:SmallCNN --option width=32 --data demo --out teacher.safetensors
    compress distill --teacher compressor/assets/resnet20_cifar10_pretrained.safetensors \\
                     --target examples/my_model.py:SmallCNN --option width=8 --data demo --epochs 5
    compress export  runs/latest --arch examples/my_model.py:SmallCNN
    compress eval    runs/latest/student.safetensors --arch examples/my_model.py:SmallCNN --data demo

Rules (docs/models.md, "Your own model"):

* ``NAME`` after the colon is an ``nn.Module`` class or a function returning one;
  ``--option KEY=VALUE`` become its keyword arguments. ``num_classes`` and
  ``in_chans`` are passed when it takes them.
* ``forward`` returns logits of shape ``(N, num_classes)`` (checked when built).
* ``INPUT_SIZE`` (optional): the default ``(C, H, W)``, here CIFAR's 32 px.
* ``LADDER`` (optional): sizes of the same model, label -> keyword arguments.
  When this model is the student, the planner picks assistants among them by
  MACs (or latency); without a ladder, assistants come from the teacher's
  family or from ``--assistants``.
* A checkpoint records ``examples/my_model.py:SmallCNN`` and the file's sha256.
  Loading it later needs the same ``--arch`` (or ``--trust-code``), and the
  file unchanged: compress never runs code just because a checkpoint names it.
"""
from torch import nn


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages of ``width``, ``2 width``, ``4 width`` channels, global pool, linear."""

    INPUT_SIZE = (3, 32, 32)
    LADDER = {"w8": {"width": 8}, "w16": {"width": 16}, "w32": {"width": 32}, "w64": {"width": 64}}

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 16):
        super().__init__()
        layers, channels = [], in_chans
        for i, out in enumerate((width, 2 * width, 4 * width)):
            layers += [nn.Conv2d(channels, out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))
