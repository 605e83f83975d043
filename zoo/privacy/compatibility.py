"""Check that Opacus can train a module with DP-SGD, and replace the layers it cannot train.

Opacus rejects layers that mix examples within a batch (BatchNorm) or keep state that
per-sample gradients cannot cover. ``opacus.validators.ModuleValidator`` finds them and
has a registered replacement for most (BatchNorm becomes GroupNorm). Its own ``fix`` deep-copies the
whole module, which would copy a LightningModule's trainer; :func:`fix_in_place` applies the
same Opacus fixers to each offending layer inside the module instead.
"""

from __future__ import annotations

import logging

import torch.nn as nn
from opacus.validators import ModuleValidator

logger = logging.getLogger(__name__)


def find_incompatible_layers(module: nn.Module) -> list[str]:
    """Return Opacus' validation errors for ``module`` as strings (empty if it is trainable).

    The module is validated in training mode, as DP-SGD trains it, and its mode is restored.
    """
    was_training = module.training
    module.train()
    try:
        errors = ModuleValidator.validate(module, strict=False)
    finally:
        module.train(was_training)
    return [str(error) for error in errors]


def _has_own_trainable_parameters(module: nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in module.parameters(recurse=False))


def fix_in_place(module: nn.Module) -> list[tuple[str, str, str]]:
    """Replace every layer of ``module`` that Opacus has a fixer for, in place.

    Returns:
        One ``(qualified name, old layer, new layer)`` triple per replaced layer. Callers
        should report them, because each new layer starts from fresh weights (a BatchNorm's
        statistics and affine weights do not carry over).
    """
    replaced: list[tuple[str, str, str]] = []
    names = [
        name
        for name, sub_module in module.named_modules()
        if name and _has_own_trainable_parameters(sub_module)
    ]
    for name in names:
        sub_module = module.get_submodule(name)
        fixer = ModuleValidator.FIXERS.get(type(sub_module))
        if fixer is None:
            continue
        new_module = fixer(sub_module)
        new_module.to(next(sub_module.parameters()).device)
        new_module.train(sub_module.training)
        parent_name, _, child_name = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child_name, new_module)
        replaced.append((name, repr(sub_module), repr(new_module)))
        logger.debug("Replaced layer %s %r with %r", name, sub_module, new_module)
    return replaced


def make_trainable_with_dp(module: nn.Module, fix: bool) -> list[tuple[str, str, str]]:
    """Validate ``module`` for Opacus and, if ``fix`` is true, replace the layers it rejects.

    Returns:
        The replaced layers as in :func:`fix_in_place` (empty when nothing was replaced).

    Raises:
        ValueError: with Opacus' errors when the module has layers Opacus rejects and ``fix``
            is false, or when they remain after fixing (no Opacus fixer exists for them).
    """
    errors = find_incompatible_layers(module)
    if not errors:
        return []
    if not fix:
        raise ValueError(
            "Opacus cannot train this model with DP-SGD: "
            + "; ".join(errors)
            + ". Set fix_model=True to replace these layers automatically (BatchNorm becomes "
            "GroupNorm), or change the model by hand."
        )
    replaced = fix_in_place(module)
    remaining = find_incompatible_layers(module)
    if remaining:
        raise ValueError(
            "Opacus cannot train this model with DP-SGD and has no automatic replacement for: "
            + "; ".join(remaining)
            + ". Replace these layers by hand with ones Opacus supports."
        )
    return replaced
