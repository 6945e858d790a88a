"""The paper's CIFAR-100 accuracy-vs-cost curves, for comparison plots.

Source: Mullapudi, Mark, Shazeer, Fatahalian, "HydraNets: Specialized Dynamic Architectures for
Efficient Inference", CVPR 2018 (doi:10.1109/CVPR.2018.00843), the CIFAR-100 figure: (a) ResNet
family, (b) DenseNet family. Digitized from Fig. (CIFAR-100), precision about ±0.005 GMACs and
±0.1 points. The x unit is 10^9 multiply-adds per image: the paper's table row "52 MADDs (x10^6),
65.81%" (1.28M parameters) sits on the first Hydra-Res point although the axis reads "x10^6".
"""
from __future__ import annotations

PAPER_CIFAR100: dict[str, list[tuple[float, float]]] = {
    "Hydra-Res": [
        (0.052, 65.81),
        (0.118, 71.24),
        (0.184, 72.30),
        (0.251, 73.35),
        (0.317, 73.84),
        (0.383, 74.29),
        (0.581, 75.26),
    ],
    "ResNet-baseline": [
        (0.052, 65.42),
        (0.109, 67.55),
        (0.137, 67.98),
        (0.250, 69.89),
        (0.505, 72.11),
        (0.760, 73.26),
    ],
    "Hydra-Dense": [
        (0.196, 72.04),
        (0.362, 73.58),
        (0.575, 74.84),
        (1.151, 76.25),
    ],
    "DenseNet-baseline": [
        (0.214, 67.57),
        (0.333, 69.41),
        (0.656, 72.18),
        (1.080, 73.80),
        (1.619, 75.03),
        (2.260, 75.43),
        (3.007, 75.68),
    ],
}
"""Model name -> (GMACs per image, top-1 %) points, cheapest first."""

PAPER_FAMILIES: dict[str, tuple[str, str]] = {
    "ResNet": ("Hydra-Res", "ResNet-baseline"),
    "DenseNet": ("Hydra-Dense", "DenseNet-baseline"),
}
"""Figure panel -> (HydraNet curve, baseline curve) in :data:`PAPER_CIFAR100`."""
