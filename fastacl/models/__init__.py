"""Models: ResNet-18 with dual batch norm, projection head, BN converter, checkpoints."""
