"""PaDiM with a semi-orthogonal embedding: the anomaly-map half of SeMaCNN (exportable torch module).

PaDiM (Defard et al. 2021, "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization") models every position of a CNN feature grid by a Gaussian
fitted on defect-free images and scores a patch by its Mahalanobis distance. SeMaCNN
(``semacnn.txt`` §2.2.2) uses it with ResNet-18 features "after each residual block",
interpolated to 64×64 and concatenated (D channels), reduced to k dimensions by the
semi-orthogonal embedding of Kim et al. 2021 ("Semi-orthogonal embedding for efficient
unsupervised anomaly segmentation"): a fixed D×k matrix W with orthonormal columns, the
Q of the QR decomposition of a seeded Gaussian matrix. PaDiM's random channel subset is
the special case ``embedding="random_select"`` (W made of k columns of the identity).
W (or the channel list) is a persistent buffer, so a checkpoint does not depend on how a
later torch version draws random numbers.

Choices (the papers leave them open; each one is a parameter):

* ``layers`` are stages of the backbone registry (:mod:`elinspect.models.backbones`):
  ``[1, 2, 3]``, the stride-4, 8 and 16 outputs, for every backbone. For ResNet-18 these
  are ``layer1..layer3``, what PaDiM (and anomalib) use; ``layer4`` (stride 32, 512
  channels) adds little localisation and 512 more dimensions. For EfficientNet-Lite0 they
  are the ends of its stride-4/8/16 stages (24 + 40 + 112 = 176 channels): the same strides,
  so the same localisation, and D = 176 still exceeds k = 100. Node names of
  ``torchvision.models.feature_extraction.get_graph_node_names`` (``layer1`` …) still work
  with any torchvision classification builder.
* The backbone never trains, so it is **folded** once when the model is built
  (:mod:`elinspect.models.backbones.folding`): batch norms into the convolutions before them,
  TensorFlow's "same" padding into the kernels — the same maps to float rounding, checked on
  a probe; 1.6× as fast for the Lite0 (``experiments/results/bench_padim.md``). A state dict
  saved before (commit a6b6d07) is folded as it loads.
* Features are resized to ``feature_size`` bilinearly (PaDiM's code repeats pixels,
  ``interpolation="nearest"``).
* The Gaussian is fitted by **streaming sums**: :meth:`update` adds Σx (P×k) and Σxxᵀ
  per position, in float64, and the image count; memory does not depend on the number of
  images. Σxxᵀ is symmetric, so only its upper triangle is kept, packed (P×k(k+1)/2; P =
  64·64, k = 100: 4096·5050·8 B = 165 MB instead of 328 MB for the full matrices). Under DDP
  sum Σx, Σxxᵀ and n over ranks (:meth:`sums` gives the live buffers for an in-place
  ``all_reduce(SUM)``; :meth:`load_sums` takes reduced copies, e.g. of Lightning's
  ``strategy.reduce(t, reduce_op="sum")``) before :meth:`finalize`.
  The sums are non-persistent buffers: a checkpoint holds the fitted Gaussian, not them.
* While the fit runs, Σxxᵀ is kept **about a shift** s (the first batch's mean, per position):
  Σ(x − s)(x − s)ᵀ. A batch's products then run on centred values in float32, whose
  rounding is relative to the spread σ, not to |x|² — on CPU a float32 batched product is
  many times faster than float64's, and the packed triangle is added row by row instead of
  gathered (on a GPU, where 100 row additions are 100 kernel launches, by one gather);
  :meth:`sums` turns the sums back into plain ones (Σxxᵀ = Σ(x−s)(x−s)ᵀ + sΣxᵀ +
  Σx sᵀ − n ssᵀ, in float64), so ranks with different shifts still add up.
* :meth:`finalize` computes the unbiased covariance chunk by chunk of positions (the
  only full k×k matrices that exist at once are one chunk's), adds ε·I (PaDiM: ε = 0.01), and
  stores the mean and the inverse Cholesky factor L⁻¹ (L Lᵀ = Σ + ε·I; float32, persistent
  buffers ``mean`` and ``inv_cholesky``, the latter lower-triangular and kept packed,
  P×k(k+1)/2: 83 MB instead of 164 MB, in memory and in checkpoints; scoring unpacks one
  chunk of positions at a time), so that the squared distance is ``‖L⁻¹ (x − μ)‖²``:
  one batched matrix product per chunk of positions, never negative. Chosen by speed on
  CPU (4096 positions, k = 100, 16 images, 2 shared cores): 45–65 ms, against 65–155 ms for
  the precision-matrix form ``(x − μ)ᵀ Σ⁻¹ (x − μ)``, 55–300 ms for ``solve_triangular``
  with L and 0.3–2.7 s for ``cholesky_solve``.
* The anomaly map is the distance (not its square), upsampled bilinearly to the input
  size and then blurred with a Gaussian of σ = 4 *input* pixels, PaDiM's order
  (``blur_at="input"``); ``blur_at="grid"`` blurs the feature grid first (σ in grid cells,
  cheaper, smoother). The image score is the map's maximum.

Inputs are N×C×H×W in [0, 1] with C = 1 (repeated to RGB) or 3; normalisation (the
backbone weights' own: ImageNet's for ResNets, [-1, 1] for EfficientNet-Lite) is part of the
module, so an exported model takes what the datamodule gives.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
import torchvision
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.feature_extraction import create_feature_extractor

from elinspect.models.anomaly.scoring import gaussian_blur_separable
from elinspect.models.backbones import IMAGENET_NORMALISATION, build_body, input_normalisation
from elinspect.models.backbones.folding import fold_for_inference, fold_state_dict
from elinspect.models.results import AnomalyResult
from elinspect.utils.errors import ConfigError
from elinspect.utils.weights import load_weights

log = logging.getLogger(__name__)


Embedding = Literal["semi_orthogonal", "random_select", "none"]


def semi_orthogonal_matrix(dims: int, k: int, seed: int = 0) -> Tensor:
    """A D×k float32 matrix with orthonormal columns (WᵀW = I), the same for the same seed.

    Kim et al. 2021: W = Q of the reduced QR decomposition of a D×k standard Gaussian
    matrix. Column signs are fixed (diag R > 0) so W does not depend on the LAPACK build.
    """
    if not 0 < k <= dims:
        raise ValueError(f"the embedding size k must lie in 1..{dims} (the feature channels), got {k}")
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dims, k, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def random_channels(dims: int, k: int, seed: int = 0) -> Tensor:
    """k distinct channel indices out of ``dims`` (PaDiM's random dimensionality reduction), sorted."""
    if not 0 < k <= dims:
        raise ValueError(f"the embedding size k must lie in 1..{dims} (the feature channels), got {k}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(dims, generator=generator)[:k].sort().values


def unpack_symmetric(packed: Tensor, k: int) -> Tensor:
    """…×k×k symmetric matrices from their packed upper triangles …×k(k+1)/2 (row-major,
    the order of ``torch.triu_indices(k, k)``)."""
    rows, cols = torch.triu_indices(k, k, device=packed.device)
    full = packed.new_zeros(*packed.shape[:-1], k, k)
    full[..., rows, cols] = packed
    full[..., cols, rows] = packed
    return full


def unpack_lower(packed: Tensor, k: int) -> Tensor:
    """…×k×k lower-triangular matrices from their packed lower triangles …×k(k+1)/2
    (row-major, the order of ``torch.tril_indices(k, k)``)."""
    rows, cols = torch.tril_indices(k, k, device=packed.device)
    full = packed.new_zeros(*packed.shape[:-1], k, k)
    full[..., rows, cols] = packed
    return full


def gaussian_from_sums(sum_x: Tensor, sum_xx: Tensor, count: Tensor | float) -> tuple[Tensor, Tensor]:
    """Mean (…×k) and unbiased covariance (…×k×k) from Σx, Σxxᵀ and the sample count n.

    Σxxᵀ may be full (…×k×k) or packed as :meth:`Padim.update` keeps it (…×k(k+1)/2).
    """
    n = float(count)
    if n < 2:
        raise RuntimeError(f"a covariance needs at least 2 samples, got {n:g}")
    if sum_xx.ndim == sum_x.ndim:  # packed upper triangle
        sum_xx = unpack_symmetric(sum_xx, sum_x.shape[-1])
    mean = sum_x / n
    cov = (sum_xx - n * mean.unsqueeze(-1) * mean.unsqueeze(-2)) / (n - 1)
    return mean, cov


def gathers_packed(device: torch.device) -> bool:
    """Whether :meth:`Padim.update` takes a batch's packed triangle by one gather (a GPU: one
    kernel) rather than row by row (a CPU: no index pass over the 165 MB triangle)."""
    return device.type == "cuda"


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one CPU thread for a while.

    Batched LAPACK calls (Cholesky, triangular solves of 1024 small matrices) open one tiny
    parallel region per matrix; when another process holds a core, the threads keep waiting
    for each other: measured 0.06 s → 6 s per 1024 triangular solves on 2 busy cores.
    Single-threaded they take 0.06 s whatever the load.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _keep_normalisation_of_older_fits(
    module: Padim, state_dict: MutableMapping[str, Any], prefix: str, *args: Any
) -> None:
    """A state dict saved before the normalisation fix (commit 30037b0) holds no normalisation:
    its Gaussians were fitted on ImageNet-normalised inputs, so it keeps ImageNet's mean and std.
    (Saved at 30037b0 itself, a fit under the Lite's own normalisation that did not save it yet,
    it is read the same way: re-fit those.)"""
    if prefix + "norm_mean" not in state_dict and prefix + "mean" in state_dict:
        mean, std = IMAGENET_NORMALISATION
        state_dict[prefix + "norm_mean"] = torch.tensor(mean).view(1, 3, 1, 1)
        state_dict[prefix + "norm_std"] = torch.tensor(std).view(1, 3, 1, 1)
        log.warning(
            "this PaDiM was saved without its input normalisation (before elinspect's normalisation "
            "fix, commit 30037b0): it keeps ImageNet's mean and std, which it was fitted with"
        )


def _fold_batch_norms_of_older_saves(
    module: Padim, state_dict: MutableMapping[str, Any], prefix: str, *args: Any
) -> None:
    """A state dict saved before the backbone's batch norms were folded (before commit
    a6b6d07) holds them apart: they are folded into its convolutions as the module's were."""
    folded = fold_state_dict(state_dict, prefix + "extractor.", module.folded_pairs)
    if folded:
        log.info("folded %d batch norms of a PaDiM saved before its backbone was folded", folded)


def _mark_fitted_after_load(module: Padim, incompatible_keys: object) -> None:
    module._fitted = bool(module.fitted)


class Padim(nn.Module):
    """PaDiM / SeMaCNN anomaly maps: ``update`` on normal images, ``finalize``, then call:
    ``padim(images)`` → :class:`~elinspect.models.results.AnomalyResult` (image scores, maps).
    The ``threshold`` buffer holds the decision threshold on the score once chosen.

    Args:
        backbone: a registry backbone (``resnet18`` … ``efficientnet_lite2``) with stage
            ``layers``, or any torchvision classification builder (``wide_resnet50_2``) with
            node-name ``layers``.
        layers: stages 1..4 (strides 4..32) or feature-extractor node names, whose outputs
            are concatenated (first = finest).
        weights: ``None`` (random init), ``imagenet``, a torchvision weights name, or a local file.
        feature_size: the grid (int or (h, w)) every feature map is resized to; P = h·w.
        embedding: ``semi_orthogonal`` (Kim et al. 2021), ``random_select`` (PaDiM) or ``none``.
        k: embedding size (ignored for ``none``, where k = D).
        seed: seeds the projection / the channel choice (both are saved as buffers too).
        interpolation: how features are resized to the grid, ``bilinear`` or ``nearest``.
        blur_sigma: σ of the Gaussian blur of the map (0 disables it).
        blur_at: ``input`` (after upsampling, PaDiM) or ``grid`` (before upsampling).
        chunk_size: positions scored (and finalised) at a time, to bound temporary memory.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        layers: Sequence[int | str] = (1, 2, 3),
        weights: str | None = None,
        feature_size: int | Sequence[int] = 64,
        embedding: Embedding = "semi_orthogonal",
        k: int = 100,
        seed: int = 0,
        interpolation: Literal["bilinear", "nearest"] = "bilinear",
        blur_sigma: float = 4.0,
        blur_at: Literal["input", "grid"] = "input",
        chunk_size: int = 256,
    ) -> None:
        super().__init__()
        if embedding not in ("semi_orthogonal", "random_select", "none"):
            raise ConfigError(f"embedding must be semi_orthogonal, random_select or none, got {embedding!r}")
        if interpolation not in ("bilinear", "nearest"):
            raise ConfigError(f"interpolation must be bilinear or nearest, got {interpolation!r}")
        if blur_at not in ("input", "grid"):
            raise ConfigError(f"blur_at must be input or grid, got {blur_at!r}")
        if all(isinstance(layer, int) for layer in layers):  # registry stages
            self.extractor, _ = build_body(backbone, weights, norm_layer="bn", stages=layers)
            self.layers = tuple(str(stage - 1) for stage in layers)  # the body's output keys
            norm_mean, norm_std = input_normalisation(backbone)
        else:
            net = torchvision.models.get_model(backbone, weights=None)
            missing = load_weights(net, weights, builder=backbone)
            if weights is not None:
                log.info("loaded %s into %s (%d tensors left at init)", weights, backbone, len(missing))
            self.layers = tuple(layers)
            self.extractor = create_feature_extractor(net, return_nodes={name: name for name in self.layers})
            norm_mean, norm_std = IMAGENET_NORMALISATION  # torchvision's classification weights
        # The backbone is frozen for good: its batch norms are folded into the convolutions and
        # TF "same" padding into the kernels (folding.py; checked on a probe, the same maps).
        # Channels-last: its convolutions run 1.4–2× faster on CPU (oneDNN; EfficientNet-Lite0,
        # 224 px, batch 16: 0.19 s against 0.32 s), the same values.
        self.extractor.eval().requires_grad_(False)
        generator = torch.Generator().manual_seed(0)
        self.folded_pairs = fold_for_inference(self.extractor, torch.randn(2, 3, 64, 64, generator=generator))
        self.extractor.to(memory_format=torch.channels_last)
        with torch.no_grad():
            probe = self.extractor(torch.zeros(1, 3, 64, 64))
        self.feature_dims = sum(probe[name].shape[1] for name in self.layers)
        size = (feature_size, feature_size) if isinstance(feature_size, int) else tuple(feature_size)
        self.feature_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.num_positions = self.feature_size[0] * self.feature_size[1]
        self.embedding = embedding
        self.k = self.feature_dims if embedding == "none" else int(k)
        self.interpolation = interpolation
        self.blur_sigma = float(blur_sigma)
        self.blur_at = blur_at
        self.chunk_size = int(chunk_size)

        # the backbone weights' own input normalisation (ImageNet's for ResNets, [-1, 1] for
        # Lites), saved with the Gaussians it was fitted under
        self.register_buffer("norm_mean", torch.tensor(norm_mean).view(1, 3, 1, 1))
        self.register_buffer("norm_std", torch.tensor(norm_std).view(1, 3, 1, 1))
        if embedding == "semi_orthogonal":
            self.register_buffer("projection", semi_orthogonal_matrix(self.feature_dims, self.k, seed))
        elif embedding == "random_select":
            self.register_buffer("channel_index", random_channels(self.feature_dims, self.k, seed))
        # The fitted Gaussian: persistent, so it travels in state_dict / checkpoints.
        # Allocated, not written (torch.empty): the pages of these 165 MB (P = 4096, k = 100)
        # become resident only when finalize() or a loaded checkpoint fills them.
        p, k = self.num_positions, self.k
        self.register_buffer("mean", torch.empty(p, k))
        self.register_buffer("inv_cholesky", torch.empty(p, k * (k + 1) // 2))  # packed L⁻¹
        self.register_buffer("fitted", torch.tensor(False))
        # the decision threshold on the image score (NaN: not chosen yet), set after validation
        self.register_buffer("threshold", torch.tensor(float("nan")))
        rows, cols = torch.triu_indices(k, k)
        self.register_buffer("triu_rows", rows, persistent=False)
        self.register_buffer("triu_cols", cols, persistent=False)
        rows, cols = torch.tril_indices(k, k)
        self.register_buffer("tril_rows", rows, persistent=False)
        self.register_buffer("tril_cols", cols, persistent=False)
        self._fitted = False
        self.register_load_state_dict_pre_hook(_keep_normalisation_of_older_fits)
        self.register_load_state_dict_pre_hook(_fold_batch_norms_of_older_saves)
        self.register_load_state_dict_post_hook(_mark_fitted_after_load)
        # where each row of the packed triangle starts: row i holds (i, i), …, (i, k − 1)
        self._row_starts = [i * k - i * (i - 1) // 2 for i in range(k + 1)]
        # Streaming sums: allocated by the first update(), not saved. ``shift`` is set while
        # Σxxᵀ is held about it (see the module docstring), None while the sums are plain.
        self.sum_x: Tensor | None
        self.sum_xx: Tensor | None
        self.count: Tensor | None
        self.shift: Tensor | None
        for name in self.running_sum_names:
            self.register_buffer(name, None, persistent=False)

    @property
    def is_fitted(self) -> bool:
        """Whether the Gaussians are fitted (or loaded): the ``fitted`` buffer, mirrored in a
        Python bool so that asking costs no device synchronisation."""
        return self._fitted

    threshold_names: tuple[str, ...] = ("threshold",)
    running_sum_names: tuple[str, ...] = ("sum_x", "sum_xx", "count", "shift")
    """The fit's per-rank state (non-persistent buffers, allocated by the first ``update``)."""

    def train(self, mode: bool = True) -> Padim:
        """The backbone stays in eval mode: batch-norm running statistics are never updated
        and features do not depend on what else is in the batch."""
        super().train(mode)
        self.extractor.eval()
        return self

    # -------------------------------------------------------------------------- features
    def _normalise(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"Padim takes N×1×H×W or N×3×H×W images in [0, 1], got shape {tuple(images.shape)}"
            )
        images = images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images - self.norm_mean) / self.norm_std

    def backbone_maps(self, images: Tensor) -> dict[str, Tensor]:
        """The backbone's outputs (channels-last) of images in [0, 1], by layer name."""
        if self.extractor.training:  # copy.deepcopy of torchvision's DualGraphModule resets it to train
            self.extractor.eval()
        return self.extractor(self._normalise(images).contiguous(memory_format=torch.channels_last))

    def features(self, images: Tensor) -> Tensor:
        """The backbone features resized to the grid and concatenated: N×D×h×w."""
        maps = self.backbone_maps(images)
        options = {"align_corners": False} if self.interpolation == "bilinear" else {}
        return torch.cat(
            [
                F.interpolate(maps[name], size=self.feature_size, mode=self.interpolation, **options)
                for name in self.layers
            ],
            dim=1,
        )

    def embed(self, images: Tensor) -> Tensor:
        """Per-position embeddings N×P×k (float32), positions in row-major grid order.

        The concatenated, resized features of :meth:`features` are never built: resizing
        (bilinear or nearest) is linear in the values and the embedding acts on channels
        only, so they commute, and ``resize([f1 f2 f3]) W = Σ_l resize(f_l W_l)`` with W split
        by rows, layer by layer. Each layer is resized with ``min(C_l, k)`` channels — for
        ResNet-18's layer3, 100 instead of 256 — which makes the embedding about 3× faster
        and its largest temporary one layer's map.
        """
        if self.embedding == "none":
            return self.features(images).flatten(2).transpose(1, 2).contiguous()
        maps = self.backbone_maps(images)
        options = {"align_corners": False} if self.interpolation == "bilinear" else {}
        out, first = None, 0
        for name in self.layers:
            layer = maps.pop(name)
            channels = slice(first, first + layer.shape[1])
            first = channels.stop  # not +=: a traced size is a tensor, += would move channels.start
            if self.embedding == "semi_orthogonal":
                weights = self.projection[channels]  # C_l×k
                if layer.shape[1] > self.k:  # embed first, then resize k channels
                    layer = torch.einsum("nchw,ck->nkhw", layer, weights)
                    weights = None
            else:  # random_select: this layer's share of the chosen channels
                chosen = self.channel_index[
                    (self.channel_index >= channels.start) & (self.channel_index < channels.stop)
                ]
                layer = layer.index_select(1, chosen - channels.start)
                weights = None
            layer = F.interpolate(layer, size=self.feature_size, mode=self.interpolation, **options)
            if weights is not None:
                layer = torch.einsum("nchw,ck->nkhw", layer, weights)
            if self.embedding == "random_select":
                out = layer if out is None else torch.cat([out, layer], dim=1)  # channels stay sorted
            else:
                out = layer if out is None else out.add_(layer)
        return out.flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------------ Gaussian fit
    def _allocate_sums(self, device: torch.device) -> None:
        p, k = self.num_positions, self.k
        self.sum_x = torch.zeros(p, k, dtype=torch.float64, device=device)
        self.sum_xx = torch.zeros(p, k * (k + 1) // 2, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        """Add a batch of defect-free images to the running sums Σx, Σxxᵀ (packed) and n."""
        emb = self.embed(images).float()  # N×P×k
        if self.sum_x is None:
            self._allocate_sums(emb.device)
        if self.shift is None:  # the first batch, or the sums were handed out plain
            seen = float(self.count)
            shift = self.sum_x / seen if seen > 0 else emb.mean(dim=0, dtype=torch.float64)
            self.shift = shift.float().double()  # a float32 value: the centring subtracts it exactly
            if seen > 0:
                self._move_sums_to_shift(-1.0)
        shift, starts = self.shift.float(), self._row_starts
        with torch.autocast(emb.device.type, enabled=False):  # float32 products under mixed precision too
            for start in range(0, self.num_positions, self.chunk_size):
                part = slice(start, start + self.chunk_size)
                values = emb[:, part].transpose(0, 1)  # p×N×k
                self.sum_x[part] += values.sum(dim=1, dtype=torch.float64)
                centred = values - shift[part].unsqueeze(1)
                outer = torch.bmm(centred.transpose(1, 2), centred)  # p×k×k, float32
                packed = self.sum_xx[part]
                if gathers_packed(outer.device):
                    packed += outer[:, self.triu_rows, self.triu_cols]
                    continue
                for row in range(self.k):  # the upper triangle's rows, added into float64
                    packed[:, starts[row] : starts[row + 1]] += outer[:, row, row:]
        self.count += emb.shape[0]

    def _move_sums_to_shift(self, sign: float) -> None:
        """Σxxᵀ += sign · (sΣxᵀ + Σx sᵀ − n ssᵀ), packed, a chunk of positions at a time:
        sign +1 turns Σ(x − s)(x − s)ᵀ into Σxxᵀ, −1 the reverse."""
        rows, cols = self.triu_rows, self.triu_cols
        for start in range(0, self.num_positions, self.chunk_size):
            part = slice(start, start + self.chunk_size)
            s, sx = self.shift[part], self.sum_x[part]
            s_rows = s[:, rows]
            moved = s_rows * (sx[:, cols] - self.count * s[:, cols]) + sx[:, rows] * s[:, cols]
            self.sum_xx[part] += sign * moved

    def sums(self) -> tuple[Tensor, Tensor, Tensor]:
        """The live (Σx P×k, Σxxᵀ packed P×k(k+1)/2, n) float64 buffers, as plain sums.

        Under DDP every rank calls ``update`` on its shard, then sums these over ranks
        (``torch.distributed.all_reduce(t, op=SUM)`` in place on each) before ``finalize``;
        the result equals a fit on all images. A rank that saw no image contributes zeros.
        """
        if self.sum_x is None:
            self._allocate_sums(self.mean.device)
        if self.shift is not None:
            self._move_sums_to_shift(+1.0)
            self.shift = None
        return self.sum_x, self.sum_xx, self.count

    def load_sums(self, sum_x: Tensor, sum_xx: Tensor, count: Tensor | float) -> None:
        """Replace the running sums (e.g. by their reduction over ranks)."""
        own_x, own_xx, own_n = self.sums()
        if sum_x.shape != own_x.shape or sum_xx.shape != own_xx.shape:
            raise ValueError(
                f"sums of shape {tuple(sum_x.shape)}, {tuple(sum_xx.shape)} do not fit this model's "
                f"{tuple(own_x.shape)}, {tuple(own_xx.shape)}"
            )
        own_x.copy_(sum_x)
        own_xx.copy_(sum_xx)
        own_n.fill_(float(count))

    def reset(self) -> None:
        """Free the running sums (the fitted Gaussian, if any, is kept)."""
        self.sum_x = self.sum_xx = self.count = self.shift = None

    @torch.no_grad()
    def finalize(self, eps: float = 0.01) -> None:
        """Turn the sums into the mean and L⁻¹, where L Lᵀ = Σ + ε·I (unbiased Σ), per position."""
        if self.count is None or float(self.count) < 2:
            seen = 0 if self.count is None else int(self.count)
            raise RuntimeError(f"Padim.finalize needs update() on at least 2 images, got {seen}")
        sum_x, sum_xx, count = self.sums()
        device = sum_x.device
        eye = torch.eye(self.k, dtype=torch.float64, device=device)
        chunk = max(1, self.chunk_size // 4)  # four k×k float64 temporaries per position
        with _single_thread() if device.type == "cpu" else nullcontext():
            for start in range(0, self.num_positions, chunk):
                part = slice(start, start + chunk)
                mean, cov = gaussian_from_sums(sum_x[part], sum_xx[part], count)
                chol, info = torch.linalg.cholesky_ex(cov + eps * eye)
                if bool(info.any()):
                    raise RuntimeError(
                        f"covariance + {eps}·I is not positive definite at some position; increase eps"
                    )
                inv_chol = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
                self.mean[part] = mean.to(self.mean)
                self.inv_cholesky[part] = inv_chol[:, self.tril_rows, self.tril_cols].to(self.inv_cholesky)
        self.fitted.fill_(True)
        self._fitted = True

    # ---------------------------------------------------------------------------- scoring
    def inverse_cholesky(self, positions: slice = slice(None)) -> Tensor:
        """The fitted L⁻¹ of the given positions, unpacked: p×k×k (lower triangular)."""
        return unpack_lower(self.inv_cholesky[positions], self.k)

    def mahalanobis(self, embeddings: Tensor) -> Tensor:
        """Distances N×P of embeddings N×P×k to the fitted per-position Gaussians (float32,
        autocast or not: bf16 would round distances near 10 by ~0.05, and scores would tie)."""
        n = embeddings.shape[0]
        out = embeddings.new_empty(n, self.num_positions, dtype=torch.float32)
        with torch.autocast(embeddings.device.type, enabled=False):
            for start in range(0, self.num_positions, self.chunk_size):
                part = slice(start, start + self.chunk_size)
                delta = (embeddings[:, part].float() - self.mean[part]).transpose(0, 1)  # p×N×k
                white = torch.bmm(delta, self.inverse_cholesky(part).transpose(1, 2))  # rows are (L⁻¹ δ)ᵀ
                out[:, part] = white.square().sum(dim=-1).sqrt().transpose(0, 1)
        return out

    def _blur(self, maps: Tensor) -> Tensor:
        if self.blur_sigma <= 0:
            return maps
        size = 2 * math.ceil(4 * self.blur_sigma) + 1
        size = min(size, 2 * (min(maps.shape[-2:]) - 1) + 1)  # reflect padding needs pad < side
        with torch.autocast(maps.device.type, enabled=False):  # float32, as the distances
            return gaussian_blur_separable(maps.float(), size, self.blur_sigma)

    def forward(self, images: Tensor) -> AnomalyResult:
        """Image scores N (each map's maximum) and anomaly maps N×1×H×W of images in [0, 1]."""
        maps = self.anomaly_maps(images)
        return AnomalyResult(self.image_score(maps), maps)

    def normalisation(self) -> dict[str, Any]:
        """How an input is normalised, for an exported model's sidecar: inside the model."""
        return {
            "inside_model": True,
            "mean": self.norm_mean.flatten().tolist(),
            "std": self.norm_std.flatten().tolist(),
        }

    def anomaly_maps(self, images: Tensor) -> Tensor:
        """Anomaly maps N×1×H×W (Mahalanobis distance, upsampled and blurred) for images in [0, 1]."""
        if not self._fitted:
            raise RuntimeError(
                "Padim is not fitted: fit first — call update(images) on defect-free images, then finalize()"
            )
        n, _, height, width = images.shape
        maps = self.mahalanobis(self.embed(images)).view(n, 1, *self.feature_size)
        if self.blur_at == "grid":
            maps = self._blur(maps)
        maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
        if self.blur_at == "input":
            maps = self._blur(maps)
        return maps

    @staticmethod
    def image_score(maps: Tensor) -> Tensor:
        """Image anomaly scores N: the maximum of each map."""
        return maps.flatten(1).amax(dim=1)
