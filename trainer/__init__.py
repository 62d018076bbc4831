"""ddpm.trainer: UNet / MLP denoisers, datasets, the training loop and checkpoints."""
