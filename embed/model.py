"""The embedding network: an ImageNet backbone trunk, GeM pooling, a 128-d projection, L2 normalisation.

``EmbeddingNet(x)`` takes ImageNet-normalised (n, 3, H, W) tensors and returns
(n, dim) unit vectors. ``EmbeddingNet.embed_features(fmap)`` runs the head alone
on a trunk feature map (for a trunk shared with the detector).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from embed.torchvision_compat import torchvision
from imgsearch import assets
from imgsearch.errors import BadInput, MissingAsset

# backbone name -> channels of its trunk's last feature map
BACKBONES = {"mobilenet_v2": 1280, "resnet50": 2048}
RESIZE_MODES = ("letterbox",)


class BadCheckpoint(BadInput):
    """A checkpoint or weights file exists but is corrupt, of the wrong kind, or fails its hash check."""

    code = "bad_checkpoint"


@dataclass(frozen=True)
class EmbedderConfig:
    """Everything that decides what vector an image gets. Stored, resolved, inside every checkpoint."""

    backbone: str = "mobilenet_v2"
    dim: int = 128
    image_size: int = 224
    resize: str = "letterbox"
    gem_p: float = 3.0  # GeM's initial exponent (learnable afterwards): 1 = average, large = max pooling
    projection_bn: bool = False  # BatchNorm1d after the Linear projection (helps metric-learning training)
    projection_seed: int = 0  # seeds the fixed orthogonal projection of an untrained head

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise BadInput(f"unknown backbone {self.backbone!r}; expected one of {sorted(BACKBONES)}")
        if self.resize not in RESIZE_MODES:
            raise BadInput(f"unknown resize mode {self.resize!r}; expected one of {list(RESIZE_MODES)}")
        if not (isinstance(self.dim, int) and 1 <= self.dim <= BACKBONES[self.backbone]):
            raise BadInput(f"embedding dim must be an int in 1..{BACKBONES[self.backbone]}, got {self.dim!r}")
        if not (isinstance(self.image_size, int) and 32 <= self.image_size <= 1024):
            raise BadInput(f"image_size must be an int in 32..1024, got {self.image_size!r}")
        if not self.gem_p >= 1.0:
            raise BadInput(f"gem_p must be >= 1, got {self.gem_p!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EmbedderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BadInput(f"unknown embedder config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


class GeM(nn.Module):
    """Generalised-mean pooling, (mean x^p)^(1/p) over H, W, with a learnable p (Radenovic et al. 2018).

    Between average (p=1) and max (p->inf) pooling: p=3 weights the strongest
    local activations, which is what tells two products apart.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([float(p)]))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)  # keeps training from drifting into p < 1, where the mean is unstable
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


class EmbeddingHead(nn.Module):
    """Trunk feature map (n, C, h, w) -> GeM -> Linear(C, dim) [-> BN] -> L2-normalised (n, dim)."""

    def __init__(self, in_channels: int, dim: int, gem_p: float = 3.0, batch_norm: bool = False):
        super().__init__()
        self.pool = GeM(gem_p)
        self.projection = nn.Linear(in_channels, dim, bias=not batch_norm)
        self.bn = nn.BatchNorm1d(dim) if batch_norm else nn.Identity()

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.bn(self.projection(self.pool(fmap))), dim=1)

    def fix_projection(self, seed: int) -> None:
        """A deterministic orthogonal projection: what an untrained head uses.

        Orthonormal rows keep the pooled features' geometry as well as a linear
        map to ``dim`` dimensions can (Johnson-Lindenstrauss), so cosine ranking
        with the pretrained trunk survives the projection. Seeded: the same
        seed gives the same vectors on every machine.
        """
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            nn.init.orthogonal_(self.projection.weight, generator=generator)
            if self.projection.bias is not None:
                self.projection.bias.zero_()


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torchvision-style ``.pth`` state dict; a missing file is MissingAsset naming the path."""
    path = Path(path)
    if not path.is_file():
        raise MissingAsset(f"backbone weights not found at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, pickle and zip errors for bad files
        raise BadCheckpoint(f"{path} cannot be read as a weights file: {exc}") from None
    if not isinstance(state, dict):
        raise BadCheckpoint(f"{path} holds a {type(state).__name__}, expected a state dict")
    return state


def build_trunk(backbone: str, weights: str | os.PathLike | None | bool = None) -> nn.Module:
    """The convolutional trunk (no pooling, no classifier).

    ``weights``: a path to ImageNet weights for this backbone; ``None`` means
    the default MobileNetV2 file from :mod:`imgsearch.assets` (checked
    sha256); ``False`` means leave random (a checkpoint will overwrite them).
    """
    if backbone == "mobilenet_v2":
        full = torchvision.models.mobilenet_v2(weights=None)
        if weights is not False:
            _load_strict(full, assets.mobilenet_v2_weights(weights), backbone)
        return full.features
    if backbone == "resnet50":
        full = torchvision.models.resnet50(weights=None)
        if weights is None:
            raise MissingAsset("the resnet50 backbone has no bundled weights; pass the path of torchvision's resnet50-*.pth")
        if weights is not False:
            _load_strict(full, weights, backbone)
        return nn.Sequential(*list(full.children())[:-2])  # drop avgpool and fc
    raise BadInput(f"unknown backbone {backbone!r}; expected one of {sorted(BACKBONES)}")


def _load_strict(model: nn.Module, path: str | os.PathLike, backbone: str) -> None:
    state = load_weights_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise BadCheckpoint(f"{path} does not hold {backbone} weights: {first_line[:300]}") from None


class EmbeddingNet(nn.Module):
    """trunk -> EmbeddingHead. Input: ImageNet-normalised (n, 3, H, W); output: (n, dim) unit vectors."""

    def __init__(self, config: EmbedderConfig, trunk: nn.Module):
        super().__init__()
        self.config = config
        self.trunk = trunk
        self.head = EmbeddingHead(BACKBONES[config.backbone], config.dim, config.gem_p, config.projection_bn)

    @classmethod
    def pretrained(cls, config: EmbedderConfig | None = None, weights: str | os.PathLike | None = None) -> EmbeddingNet:
        """ImageNet trunk + the fixed seeded projection: the untrained demo model."""
        config = config or EmbedderConfig()
        net = cls(config, build_trunk(config.backbone, weights))
        net.head.fix_projection(config.projection_seed)
        return net.eval()

    @classmethod
    def skeleton(cls, config: EmbedderConfig) -> EmbeddingNet:
        """The architecture with random weights, for a checkpoint's state dict to fill."""
        return cls(config, build_trunk(config.backbone, weights=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def embed_features(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(fmap)
