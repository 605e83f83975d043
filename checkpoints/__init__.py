"""Pretrained checkpoints (``NAME.pt``) and their manifests (``NAME.json``)."""
