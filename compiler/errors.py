"""Typed errors of qhl. Every error qhl raises on purpose is defined here.

Messages say what failed, where (node name or module path), what was expected, and what to do.
"""
from __future__ import annotations

__all__ = [
    "QhlError",
    "RecipeError",
    "CaptureError",
    "UnsupportedError",
    "KernelError",
    "VerificationError",
    "AdapterError",
]


class QhlError(Exception):
    """Base class of every error qhl raises on purpose."""


class RecipeError(QhlError, ValueError):
    """An unknown recipe name or knob, or a knob value out of range. Lists the valid choices."""


class CaptureError(QhlError):
    """The model could not be captured into an FX graph (torch.export or Dynamo failed)."""


class UnsupportedError(QhlError, ValueError):
    """An input the library cannot handle: names the node or module path and what to do."""


class KernelError(QhlError, RuntimeError):
    """A kernel was launched with arguments it cannot take (shape, dtype, device, block size)."""


class VerificationError(QhlError, AssertionError):
    """verify=True found that a pass changed the graph's numbers beyond what the pass allows."""


class AdapterError(QhlError, ValueError):
    """An adapter (a peft adapter directory, a state dict) that does not fit the model: names the
    first mismatched key and what was expected."""
