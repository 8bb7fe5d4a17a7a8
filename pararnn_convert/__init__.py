"""Weight conversion between pararnn_torch, pararnn_mlx and Apple ml-pararnn checkpoints (``pararnn-convert``)."""
