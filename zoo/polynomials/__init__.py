"""Hierarchical polynomial targets and three-layer networks trained layer by layer.

Implements the setting of Wang, Nichani and Lee, "Learning Hierarchical Polynomials with
Three-Layer Neural Networks" (ICLR 2024). The package provides targets ``h = g(p(x))``
with a degree-k feature p of Gaussian inputs, the three-layer network with a frozen
random first layer, and its two-stage training. Two baselines share the same framework:
a two-layer network trained end to end and ridge regression on random features.
"""

from zoo.polynomials.baselines import RandomFeatureRidge, TwoLayerRegressor
from zoo.polynomials.layerwise import fit_layerwise
from zoo.polynomials.layerwise_module import LayerwiseThreeLayer
from zoo.polynomials.networks import RandomFeatures, ThreeLayerNetwork, TwoLayerNetwork
from zoo.polynomials.targets import HierarchicalPolynomial

__all__ = [
    "HierarchicalPolynomial",
    "LayerwiseThreeLayer",
    "RandomFeatureRidge",
    "RandomFeatures",
    "ThreeLayerNetwork",
    "TwoLayerNetwork",
    "TwoLayerRegressor",
    "fit_layerwise",
]
