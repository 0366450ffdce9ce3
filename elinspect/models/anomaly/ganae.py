"""GAN-AE networks (``gan-ae.txt`` §II, §III.A): a ResNet generator, critic and encoder, and
the scoring module :class:`GanAe` (eq. 6 and 7 with the sign slip corrected, DESIGN.md §2).

"ResNet are utilized as the backbone structure of WGAN-GP and encoder, each comprising four
residual blocks. We use a 3 × 3 convolution kernel with a stride of 1 and the activation
function is RELU" (§III.A). The paper gives no widths or resampling; the blocks follow the
ResNet WGAN-GP of Gulrajani et al. 2017 (the paper's ref. [19]), which has exactly that shape:
every residual block is two 3×3 stride-1 convolutions with ReLU, resampling by nearest-neighbour
upsampling (generator) or 2×2 average pooling (critic, encoder) and a 1×1 shortcut.

* :class:`ResidualGenerator` — z (``latent_dim``) → linear → 8c × s × s, s = image_size / 16,
  four up-blocks (8c, 4c, 2c, c; ×2 each) → BN-ReLU-conv3×3 → tanh. ``image_size`` 64, 128,
  256… (a multiple of 16); ``norm="batch"`` (Gulrajani's generator) or ``"none"``.
* :class:`ResidualCritic` — conv3×3 → four down-blocks (c, 2c, 4c, 8c; ÷2 each) → ReLU →
  global average → **features** (8c, the penultimate layer f of eq. 3, 5–7) → linear → D(x).
  No normalisation: the gradient penalty is per sample, batch norm would couple samples.
* :class:`Encoder` — the critic's trunk with a linear head to the latent space (the paper:
  "four residual blocks" for the encoder too).

The networks work in [−1, 1]; :class:`GanAe` takes and returns images in [0, 1] (what every
datamodule serves), converting input channels (grey ↔ RGB) and size to the networks' own.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from elinspect.losses.reconstruction import check_ssim_window, ssim_per_image
from elinspect.models.results import Reconstruction
from elinspect.utils.errors import ConfigError

Norm = Literal["batch", "none"]
ScoreKind = Literal["mse_feat", "mse_ssim_feat"]
SCORES: tuple[str, ...] = ("mse_feat", "mse_ssim_feat")
NUM_BLOCKS = 4


def check_image_size(image_size: int) -> int:
    """``image_size`` must halve four times into a whole number (16, 32, 64, 128, 256…)."""
    if image_size < 16 or image_size % 2**NUM_BLOCKS:
        raise ConfigError(
            f"image_size must be a multiple of {2**NUM_BLOCKS} (four residual blocks each halve or "
            f"double it), e.g. 64, 128 or 256; got {image_size}"
        )
    return image_size


class ResidualBlock(nn.Module):
    """Two 3×3 stride-1 convolutions with ReLU (pre-activation), resampling in ``"up"``
    (nearest ×2 before the convolutions) or ``"down"`` (2×2 average pool after), and a
    1×1 shortcut where the shape changes (Gulrajani et al. 2017, ResNet WGAN-GP)."""

    def __init__(
        self, in_channels: int, out_channels: int, resample: Literal["up", "down", "none"], norm: Norm
    ) -> None:
        super().__init__()
        if resample not in ("up", "down", "none"):
            raise ConfigError(f"resample must be up, down or none, got {resample!r}")
        if norm not in ("batch", "none"):
            raise ConfigError(f"norm must be batch or none, got {norm!r}")
        self.resample = resample
        self.norm1 = nn.BatchNorm2d(in_channels) if norm == "batch" else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1)
        self.norm2 = nn.BatchNorm2d(out_channels) if norm == "batch" else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1)
        needs_shortcut = in_channels != out_channels or resample != "none"
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if needs_shortcut else nn.Identity()

    def _resize(self, x: Tensor, where: str) -> Tensor:
        if where == "before" and self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if where == "after" and self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor) -> Tensor:
        skip = self._resize(self.shortcut(self._resize(x, "before")), "after")
        h = self._resize(F.relu(self.norm1(x)), "before")
        h = self.conv1(h)
        h = self.conv2(F.relu(self.norm2(h)))
        return skip + self._resize(h, "after")


def widths(base_channels: int) -> list[int]:
    """Channels after the input and after each of the four blocks of the critic/encoder trunk
    (the generator runs them in reverse)."""
    return [base_channels, base_channels, 2 * base_channels, 4 * base_channels, 8 * base_channels]


class ResidualGenerator(nn.Module):
    """G: latent z (N×latent_dim, drawn from N(0, I)) → image N×C×S×S in [−1, 1] (see the
    module docstring)."""

    def __init__(
        self,
        latent_dim: int = 128,
        channels: int = 1,
        image_size: int = 64,
        base_channels: int = 16,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        self.latent_dim, self.channels = latent_dim, channels
        self.image_size = check_image_size(image_size)
        self.start = image_size // 2**NUM_BLOCKS
        w = widths(base_channels)[::-1]  # 8c, 4c, 2c, c, c
        self.fc = nn.Linear(latent_dim, w[0] * self.start**2)
        self.blocks = nn.Sequential(*(ResidualBlock(w[i], w[i + 1], "up", norm) for i in range(NUM_BLOCKS)))
        self.out_norm = nn.BatchNorm2d(w[-1]) if norm == "batch" else nn.Identity()
        self.out = nn.Conv2d(w[-1], channels, 3, stride=1, padding=1)
        self._first_width = w[0]

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).view(len(z), self._first_width, self.start, self.start)
        h = self.blocks(h)
        return torch.tanh(self.out(F.relu(self.out_norm(h))))

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n latent vectors from N(0, I) on the generator's device (§II.A: z Gaussian)."""
        device = self.fc.weight.device
        return torch.randn(n, self.latent_dim, generator=generator, device=device)


class _Trunk(nn.Module):
    """conv3×3 → four residual down-blocks → ReLU → global average: N×8c."""

    def __init__(self, channels: int, image_size: int, base_channels: int, norm: Norm) -> None:
        super().__init__()
        check_image_size(image_size)
        w = widths(base_channels)
        self.stem = nn.Conv2d(channels, w[0], 3, stride=1, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(w[i], w[i + 1], "down", norm) for i in range(NUM_BLOCKS)))
        self.out_features = w[-1]

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.blocks(self.stem(x))).mean(dim=(2, 3))


class ResidualCritic(nn.Module):
    """D: image N×C×S×S in [−1, 1] → N critic values; :meth:`features` is the penultimate
    layer f (N×n_f, n_f = 8 × base_channels) of eq. 3 and 5–7."""

    def __init__(self, channels: int = 1, image_size: int = 64, base_channels: int = 16) -> None:
        super().__init__()
        self.trunk = _Trunk(channels, image_size, base_channels, norm="none")
        self.head = nn.Linear(self.trunk.out_features, 1)

    @property
    def feature_dim(self) -> int:
        return self.trunk.out_features

    def features(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x)).squeeze(1)


class Encoder(nn.Module):
    """E: image N×C×S×S in [−1, 1] → latent N×latent_dim (unbounded: G was trained on
    Gaussian z, §II.B)."""

    def __init__(
        self,
        latent_dim: int = 128,
        channels: int = 1,
        image_size: int = 64,
        base_channels: int = 16,
        norm: Norm = "none",
    ) -> None:
        super().__init__()
        self.trunk = _Trunk(channels, image_size, base_channels, norm)
        self.head = nn.Linear(self.trunk.out_features, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


# ------------------------------------------------------------------------------ losses
def gradient_penalty(
    critic: nn.Module,
    real: Tensor,
    fake: Tensor,
    k: float = 1.0,
    eps: Tensor | None = None,
) -> Tensor:
    """E[(‖∇_x̃ D(x̃)‖₂ − K)²] over x̃ = ε·real + (1 − ε)·fake, ε ~ U[0, 1] per sample
    (eq. 2's last term without λ; Gulrajani et al. 2017 Alg. 1). Differentiable (the
    gradient is taken with ``create_graph``), so the critic is trained through it."""
    if eps is None:
        eps = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device, dtype=real.dtype)
    mixed = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    with torch.enable_grad():
        out = critic(mixed)
        (grad,) = torch.autograd.grad(out.sum(), mixed, create_graph=True)
    norm = grad.flatten(1).norm(2, dim=1)
    return ((norm - k) ** 2).mean()


def critic_loss(
    critic: nn.Module, real: Tensor, fake: Tensor, gp_lambda: float = 10.0, k: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 2: E[D(G(z))] − E[D(x)] + λ·E[(‖∇D(x̃)‖₂ − K)²] on network-range images; also
    returns the Wasserstein estimate E[D(x)] − E[D(G(z))] and the penalty (detached)."""
    d_real, d_fake = critic(real).mean(), critic(fake).mean()
    penalty = gradient_penalty(critic, real, fake, k=k)
    loss = d_fake - d_real + gp_lambda * penalty
    return loss, {"wasserstein": (d_real - d_fake).detach(), "gradient_penalty": penalty.detach()}


def generator_loss(critic: nn.Module, fake: Tensor) -> Tensor:
    """Eq. 1: −E[D(G(z))]."""
    return -critic(fake).mean()


def fit_images(images: Tensor, channels: int, image_size: int) -> Tensor:
    """Images N×C'×H×W in [0, 1] → N×channels×image_size×image_size: RGB to grey by the
    channel mean, grey repeated to RGB, resized (bilinear, antialiased when shrinking)."""
    if images.shape[1] != channels:
        if channels == 1:
            images = images.mean(dim=1, keepdim=True)
        elif images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        else:
            raise ValueError(f"cannot turn {images.shape[1]}-channel images into {channels} channels")
    if images.shape[-2:] != (image_size, image_size):
        shrink = max(images.shape[-2:]) > image_size
        images = F.interpolate(
            images.float(),
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=shrink,
        )
    return images.float()


# --------------------------------------------------------------------------- scoring
class GanAe(nn.Module):
    """Generator, critic and encoder, and the anomaly score of a test image (§II.C).

    With x̂ = G(E(x)) (images in [0, 1]), n_i the number of image values and n_f the
    critic's feature width (DESIGN.md §2 corrects the printed minus sign of eq. 6/7):

    * ``score="mse_feat"`` (eq. 6): A = k1/n_i·‖x − x̂‖² + k2/n_f·‖f(x) − f(x̂)‖²
    * ``score="mse_ssim_feat"`` (eq. 7): A = k1/n_i·‖x − x̂‖² / SSIM(x, x̂) + k2/n_f·‖f(x) − f(x̂)‖²

    SSIM lies in [−1, 1]; eq. 7 divides by it, so it is clamped below at ``ssim_floor``
    (a reconstruction with SSIM ≤ floor scores as if its SSIM were the floor: the largest
    possible amplification of its MSE). f is evaluated on the network range [−1, 1], the
    pixel terms on [0, 1]. The localisation map is |x − x̂| (channel mean), §II.C.

    ``forward(images)`` → :class:`~elinspect.models.results.Reconstruction` (scores N, maps
    N×1×H×W at the input's size, x̂ at the networks' size): a tuple of tensors, so the module can
    be traced or exported as one piece. The ``threshold`` buffer holds the decision threshold on
    the score once chosen (NaN before).
    """

    threshold_names: tuple[str, ...] = ("threshold",)

    def __init__(
        self,
        generator: ResidualGenerator,
        critic: ResidualCritic,
        encoder: Encoder,
        score: ScoreKind = "mse_ssim_feat",
        k1: float = 1.0,
        k2: float = 1.0,
        ssim_floor: float = 0.01,
        ssim_kernel: int = 11,
        ssim_sigma: float = 1.5,
    ) -> None:
        super().__init__()
        if score not in SCORES:
            raise ConfigError(f"score must be one of {SCORES}, got {score!r}")
        if not 0 < ssim_floor <= 1:
            raise ConfigError(f"ssim_floor must lie in (0, 1], got {ssim_floor}")
        check_ssim_window(ssim_kernel, ssim_sigma)
        self.generator, self.critic, self.encoder = generator, critic, encoder
        self.score_kind = score
        self.k1, self.k2, self.ssim_floor = float(k1), float(k2), float(ssim_floor)
        self.ssim_kernel, self.ssim_sigma = int(ssim_kernel), float(ssim_sigma)
        self.channels, self.image_size = generator.channels, generator.image_size
        self.register_buffer("threshold", torch.tensor(float("nan")))

    def normalisation(self) -> dict[str, Any]:
        """What the networks are fed, for an exported model's sidecar: prepared inside the model."""
        return {
            "inside_model": True,
            "network_input": f"{self.channels} channel(s) at {self.image_size} px (grey = channel "
            "mean; bilinear resize, antialiased when shrinking), scaled to [-1, 1]",
        }

    @classmethod
    def build(
        cls,
        channels: int = 1,
        image_size: int = 64,
        latent_dim: int = 128,
        base_channels: int = 16,
        generator_norm: Norm = "batch",
        encoder_norm: Norm = "none",
        **score: object,
    ) -> GanAe:
        """The three networks of one shape, and the scoring options (``score``, ``k1``…)."""
        return cls(
            ResidualGenerator(latent_dim, channels, image_size, base_channels, generator_norm),
            ResidualCritic(channels, image_size, base_channels),
            Encoder(latent_dim, channels, image_size, base_channels, encoder_norm),
            **score,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ conversions
    def prepare(self, images: Tensor) -> Tensor:
        """Data images (any size, grey or RGB, [0, 1]) → the networks' size and channels, [0, 1]."""
        return fit_images(images, self.channels, self.image_size)

    @staticmethod
    def to_net(x01: Tensor) -> Tensor:
        return x01 * 2 - 1

    @staticmethod
    def to_image(x: Tensor) -> Tensor:
        return (x + 1) / 2

    def generate(self, z: Tensor) -> Tensor:
        """G(z) as images in [0, 1]."""
        return self.to_image(self.generator(z))

    def reconstruct(self, x01: Tensor) -> Tensor:
        """x̂ = G(E(x)) in [0, 1] for prepared images x (the networks' size)."""
        return self.to_image(self.generator(self.encoder(self.to_net(x01))))

    def features(self, x01: Tensor) -> Tensor:
        """f(x): the critic's penultimate features of prepared images in [0, 1]."""
        return self.critic.features(self.to_net(x01))

    # ---------------------------------------------------------------------- scores
    def analyse(self, images: Tensor) -> dict[str, Tensor]:
        """Everything a score needs, for data images (prepared here): ``x``, ``x_hat`` (the
        networks' size, [0, 1]), ``feat_x``, ``feat_x_hat`` (f of both), and per image
        ``mse`` = 1/n_i‖x − x̂‖², ``ssim`` = SSIM(x, x̂), ``feat`` = 1/n_f‖f(x) − f(x̂)‖²."""
        x = self.prepare(images)
        x_hat = self.reconstruct(x)
        feat_x, feat_x_hat = self.features(x), self.features(x_hat)
        return {
            "x": x,
            "x_hat": x_hat,
            "feat_x": feat_x,
            "feat_x_hat": feat_x_hat,
            "mse": (x - x_hat).pow(2).flatten(1).mean(dim=1),
            "ssim": ssim_per_image(x, x_hat, self.ssim_kernel, self.ssim_sigma),
            "feat": (feat_x - feat_x_hat).pow(2).mean(dim=1),
        }

    def combine(self, terms: dict[str, Tensor], score: str | None = None) -> Tensor:
        """Eq. 6 or eq. 7 from :meth:`analyse`'s terms (``score`` defaults to the module's)."""
        kind = score or self.score_kind
        if kind == "mse_feat":
            pixel = terms["mse"]
        elif kind == "mse_ssim_feat":
            pixel = terms["mse"] / terms["ssim"].clamp_min(self.ssim_floor)
        else:
            raise ValueError(f"score must be one of {SCORES}, got {kind!r}")
        return self.k1 * pixel + self.k2 * terms["feat"]

    @staticmethod
    def residual_map(x: Tensor, x_hat: Tensor) -> Tensor:
        """|x − x̂|, channel mean: N×1×H×W (§II.C's localisation "heat map of differences")."""
        return (x - x_hat).abs().mean(dim=1, keepdim=True)

    def localise(self, x: Tensor, x_hat: Tensor, size: tuple[int, ...]) -> Tensor:
        """|x − x̂| resized (bilinear) to ``size`` (H, W): the map at the data's resolution."""
        maps = self.residual_map(x, x_hat)
        if tuple(maps.shape[-2:]) != tuple(size):
            maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
        return maps

    def forward(self, images: Tensor) -> Reconstruction:
        """Anomaly scores (N), localisation maps (N×1×H×W at the input's H×W) and reconstructions."""
        out = self.analyse(images)
        maps = self.localise(out["x"], out["x_hat"], images.shape[-2:])
        return Reconstruction(self.combine(out), maps, out["x_hat"])
