"""A PyTorch Lightning model zoo of recent research methods.

The hub functions are the entry points for Python users::

    import zoo

    zoo.list_models("face-*")
    model = zoo.load_pretrained("face-unpg")

They are imported on first use, so ``import zoo.face`` does not pull in the hub.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_model", "list_models", "list_pretrained", "load_pretrained"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in __all__:
        from zoo import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
