"""iterreg: the registration engine of IterativeRegistration (pure PyTorch/NumPy/SimpleITK; no Slicer, no Qt).

Modules: ``spatial`` (voxel-space conventions), ``geometry`` (physical space), ``imaging`` (IO and
preprocessing), ``losses``, ``metrics``, ``methods`` (the method interface and its implementations),
``sample_data``, ``landmarks``, ``pictures``, ``cli``.
"""
__version__ = "0.1.0"
