"""Differentially private training.

``zoo.privacy.dpsgd`` trains any zoo LightningModule with DP-SGD through Opacus, configured
as a Lightning callback. The DIFF2 optimizer lives in ``zoo.privacy.diff2``.
"""
