"""Models: each method is an exportable torch ``nn.Module`` wrapped by a LightningModule."""
