"""Object detection and instance segmentation (filled in below)."""
