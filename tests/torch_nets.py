"""PyTorch networks for the import tests (torch is a dev dependency; see docs/COMPILER.md)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class AlexNet(nn.Module):
    """torchvision.models.AlexNet's architecture, copied (torchvision 0.29, BSD-3-Clause):
    tests import what a user of torchvision would export, without torchvision or weights."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class Ops1(nn.Module):
    """Input arithmetic, ReLU6, an affine map after it (folded forward), zero Pad, HardSwish,
    adaptive pooling that divides the map (AveragePool), GELU (erf), a final LogSoftmax."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc1, self.fc2 = nn.Linear(36, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.c1(x * 2.0 - 0.5))
        x = F.hardswish(self.c2(F.pad(x, (1, 1, 1, 1)))) / 3.0 + 0.1
        x = torch.flatten(self.pool(x), 1)
        return F.log_softmax(self.fc2(F.gelu(self.fc1(x))), dim=1)


class Ops2(nn.Module):
    """BatchNorm, SiLU, max pooling, Tanh, adaptive pooling with overlapping windows (2x2 ->
    3x3), Sigmoid, division by a constant, a final Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), \
            nn.Conv2d(4, 4, 3)
        self.pool = nn.AdaptiveAvgPool2d((3, 3))
        self.fc1, self.fc2 = nn.Linear(36, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.silu(self.bn(self.c1(x))), 2)
        x = torch.flatten(self.pool(torch.tanh(self.c2(x))), 1)
        return torch.softmax(self.fc2(torch.sigmoid(self.fc1(x))) / 2.0, dim=1)


class Ops3(nn.Module):
    """GELU (tanh form), a global mean (ReduceMean), layout no-ops (Transpose of unit axes,
    Unsqueeze/Squeeze, Reshape), LeakyReLU, clamp; adaptive pooling 1x1 -> 2x2 (repeat)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2)
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c1(x), approximate="tanh").mean((2, 3), keepdim=True)
        x = x.transpose(2, 3).unsqueeze(1).squeeze(1).reshape(1, -1)
        x = F.leaky_relu(self.fc1(x), 0.1)
        x = torch.clamp(self.fc2(x), -1.0, 2.0).reshape(1, 6, 1, 1)
        return self.fc3(torch.flatten(F.adaptive_avg_pool2d(x, 2), 1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x))) + x


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 2, 3), nn.Conv2d(2, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.c1(x), self.c2(x)], 1)


class LayerNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 4), nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(torch.flatten(x, 1)))


class ChannelsLast(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.c1(x).permute(0, 2, 3, 1), 1))


def more_activations() -> nn.Module:
    """ELU exports as Greater/Where/Exp, PReLU as PRelu: recognised by value too."""
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Hardsigmoid(), nn.Conv2d(2, 2, 3), nn.Mish(),
                         nn.Conv2d(2, 2, 1), nn.ELU(), nn.Conv2d(2, 2, 1), nn.Softplus(),
                         nn.Conv2d(2, 2, 1), nn.PReLU(), nn.Flatten(), nn.Linear(32, 3))


class Upsampled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.c1(x), scale_factor=2.0)
