"""GAN-AE's pictures (``gan-ae.txt`` Fig. 4, 6 and 7): generated samples and reconstructions.

After every ``every_n_epochs``-th training epoch (and the last one) it saves, under
``<trainer.default_root_dir>/samples/``:

* ``epoch_XXX_generated.png`` — G(z) for a fixed, seeded set of latent vectors z ~ N(0, I)
  (the same z every time, so the grids show the generator's progress; Fig. 4);
* ``epoch_XXX_reconstructed.png`` — once the encoder trains (stage 2 on): the first
  validation images (the first training normals when no validation ran) in the top row,
  their reconstructions G(E(x)) below, and |x − x̂| (scaled to the grid's maximum) in the
  bottom row (Fig. 6 and 7).

With a :class:`~lightning.pytorch.loggers.WandbLogger` attached both are logged to W&B under
``ganae/generated`` and ``ganae/reconstructed``. :class:`~elinspect.models.anomaly.ganae_module.GanAeModule`
adds this callback itself (``model.samples_every_n_epochs``, 0 turns it off); it works with any
module that has a :class:`~elinspect.models.anomaly.ganae.GanAe` as ``net`` and a ``stage``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor, nn
from torchvision.utils import make_grid

from elinspect.callbacks.pictures import save_and_log_pictures
from elinspect.data.normals import normal_images
from elinspect.utils.errors import ConfigError

if TYPE_CHECKING:  # the callback reads any module's ``net`` with GanAe's methods
    from elinspect.models.anomaly.ganae import GanAe


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode without gradients; every submodule's mode restored after."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def to_uint8_rgb(grid: Tensor) -> Tensor:
    """A 1- or 3-channel picture in [0, 1] → uint8 3×H×W."""
    grid = grid.detach().cpu().float().clamp(0, 1)
    if grid.shape[0] == 1:
        grid = grid.expand(3, -1, -1)
    return (grid * 255).round().to(torch.uint8)


def generated_grid(net: GanAe, z: Tensor) -> Tensor:
    """G(z) as one uint8 picture (a roughly square grid)."""
    images = net.generate(z.to(net.generator.fc.weight.device))
    nrow = max(1, round(len(z) ** 0.5))
    return to_uint8_rgb(make_grid(images, nrow=nrow, padding=2, pad_value=1.0))


def reconstruction_grid(net: GanAe, images: Tensor) -> Tensor:
    """Rows: x, G(E(x)), |x − x̂| (scaled to its maximum), as one uint8 picture."""
    x = net.prepare(images.to(net.generator.fc.weight.device))
    x_hat = net.reconstruct(x)
    residual = net.residual_map(x, x_hat)
    residual = (residual / residual.max().clamp_min(1e-12)).expand(-1, x.shape[1], -1, -1)
    rows = torch.cat([x, x_hat, residual])
    return to_uint8_rgb(make_grid(rows, nrow=len(x), padding=2, pad_value=1.0))


class GanAeSamplesCallback(L.Callback):
    """Save (and log to W&B) generated samples and reconstructions (see the module docstring)."""

    def __init__(self, every_n_epochs: int = 5, num_images: int = 16, seed: int = 0) -> None:
        super().__init__()
        if every_n_epochs < 1 or num_images < 1:
            raise ConfigError("every_n_epochs and num_images must be >= 1")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.seed = seed
        self._val_images: list[Tensor] = []
        self._train_images: list[Tensor] = []

    @staticmethod
    def _keep(store: list[Tensor], images: Tensor, limit: int) -> None:
        kept = sum(len(t) for t in store)
        if kept < limit and len(images):
            store.append(images[: limit - kept].detach().cpu())

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_images, self._train_images = [], []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._keep(self._train_images, normal_images(batch), self.num_images)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking:
            self._keep(self._val_images, batch["image"], self.num_images)

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and epoch + 1 >= trainer.max_epochs
        return (epoch + 1) % self.every_n_epochs == 0 or last or bool(trainer.fast_dev_run)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        images = self._val_images or self._train_images
        self._val_images, self._train_images = [], []
        if not self._due(trainer) or not trainer.is_global_zero:
            return
        net: GanAe = pl_module.net  # type: ignore[assignment]
        z = torch.randn(
            self.num_images, net.generator.latent_dim, generator=torch.Generator().manual_seed(self.seed)
        )
        pictures = {}
        with evaluating(pl_module):
            pictures["generated"] = generated_grid(net, z)
            if images and getattr(pl_module, "stage", "done") != "generator":
                pictures["reconstructed"] = reconstruction_grid(net, torch.cat(images)[: self.num_images])
        directory = Path(trainer.default_root_dir) / "samples"
        for name, picture in pictures.items():
            path = directory / f"epoch_{trainer.current_epoch:03d}_{name}.png"
            save_and_log_pictures(
                trainer, f"ganae/{name}", [picture], [path], [f"epoch {trainer.current_epoch}"]
            )
