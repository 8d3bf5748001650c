"""IterativeRegistration: Slicer scripted module (thin layer over the ``iterreg`` engine).

This file holds only the Slicer classes (DESIGN.md §5). The panel (Widget), the MRML Logic and the
background worker arrive with issues #3 and #4; until then the module registers itself with Slicer, and its
self-test runs the engine on the bundled sample pair inside Slicer's Python.
"""
import os
import sys

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

try:  # Slicer >= 5.6 has translations; older versions fall back to plain strings
    from slicer.i18n import tr as _
except ImportError:  # pragma: no cover
    def _(text):
        return text

# The engine package sits next to this file in a source checkout and in the extension's install tree.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


class IterativeRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Iterative Registration")
        self.parent.categories = [_("Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["IterativeRegistration developers"]
        self.parent.helpText = _(
            "Learned iterative deformable registration (RIIR, DEQReg, IIRP-Net, R2N2, DIO) and a classical "
            "optimizer, shown step by step: the moving image warping, the displacement field and the "
            "networks' hidden states.")
        self.parent.acknowledgementText = _(
            "Sample anatomy: MNI ICBM152 2009 template as distributed with nilearn (BSD-3-Clause).")


class IterativeRegistrationTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the engine registers the bundled pair and beats identity."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_engine_registers_the_bundled_pair()

    def test_engine_registers_the_bundled_pair(self):
        self.delayDisplay("Registering the bundled sample pair with the classical optimizer")
        import SimpleITK as sitk
        import numpy as np
        import torch

        from iterreg.imaging import prepare_pair
        from iterreg.methods import get_method
        from iterreg.metrics import dice
        from iterreg.resources import sample_pair_dir
        from iterreg.sample_data import read_pair
        from iterreg.spatial import warp_labels

        os.environ.setdefault("ITERREG_RESOURCES", os.path.join(_HERE, "..", "Resources"))
        pair = read_pair(sample_pair_dir())
        prepared = prepare_pair(pair.fixed, pair.moving)
        steps = list(get_method("classical").create().run(prepared.fixed, prepared.moving, steps=60))
        moving_labels = torch.from_numpy(sitk.GetArrayFromImage(pair.moving_labels).astype(np.int64))[None, None]
        fixed_labels = sitk.GetArrayFromImage(pair.fixed_labels)
        before = dice(fixed_labels, moving_labels[0, 0].numpy())["mean"]
        after = dice(fixed_labels, warp_labels(moving_labels, steps[-1].displacement)[0, 0].numpy())["mean"]
        self.assertGreater(after, before)
        self.delayDisplay(f"Dice {before:.3f} -> {after:.3f} in {len(steps)} steps")
