"""Differentially private training.

``zoo.privacy.dpsgd`` trains any zoo LightningModule with DP-SGD through Opacus, configured
as a Lightning callback (``zoo.privacy.modes`` runs Opacus' per-example gradient modes,
``zoo.privacy.independence`` checks that the loss keeps examples apart). The DIFF2
optimizer lives in ``zoo.privacy.diff2``, its local variance-reduced subroutine in
``zoo.privacy.diff2_local``.
"""
