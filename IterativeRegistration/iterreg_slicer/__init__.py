"""Slicer glue of IterativeRegistration: MRML <-> arrays, sequences, markups, plots, and the Qt side of the
worker client. Imports ``qt``/``slicer`` and is therefore never imported by the engine (``iterreg``)."""
