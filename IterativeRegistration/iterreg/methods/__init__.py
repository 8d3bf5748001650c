"""Registry of registration methods: one module per method, all behind :class:`RegistrationMethod`."""
from __future__ import annotations

from ..errors import InputError
from .base import MethodOptions, Prompts, RegistrationMethod, Step, finite_steps
from .classical import ClassicalMethod
from .deqreg import DEQRegMethod
from .dio import DIOMethod
from .identity import IdentityMethod
from .iirp import IIRPMethod
from .r2n2 import R2N2Method
from .riir import RIIRMethod
from .voxelmorph import VoxelMorphMethod

__all__ = ["available_methods", "ready_methods", "get_method", "register_method", "Step", "Prompts", "RegistrationMethod", "MethodOptions",
           "finite_steps"]

_METHODS: dict[str, type[RegistrationMethod]] = {m.name: m for m in (IdentityMethod, ClassicalMethod,
                                                                     VoxelMorphMethod, RIIRMethod, DEQRegMethod,
                                                                     IIRPMethod, R2N2Method, DIOMethod)}


def available_methods() -> dict[str, type[RegistrationMethod]]:
    """Name -> class of every method this installation can run."""
    return dict(_METHODS)


def ready_methods(ndim: int) -> list[str]:
    """Methods that register ``ndim``-D images as installed: those needing no checkpoint, and learned ones with a
    bundled checkpoint for that dimension (VoxelMorph's is 3D only, so it is not ready for 2D images)."""
    from ..resources import default_checkpoint
    return [name for name, cls in _METHODS.items() if ndim in cls.supported_ndims
            and (not cls.needs_checkpoint or default_checkpoint(name, ndim) is not None)]


def get_method(name: str) -> type[RegistrationMethod]:
    try:
        return _METHODS[name]
    except KeyError:
        raise InputError(f"unknown method '{name}'; choose one of: {', '.join(sorted(_METHODS))}") from None


def register_method(cls: type[RegistrationMethod]) -> type[RegistrationMethod]:
    """Add a method (e.g. a research prototype) to this process's registry; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, RegistrationMethod)):
        raise TypeError(f"{cls!r} is not a RegistrationMethod subclass")
    _METHODS[cls.name] = cls
    return cls
