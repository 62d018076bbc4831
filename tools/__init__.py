"""Development tools of the ddpm repository (not shipped in the wheel)."""
