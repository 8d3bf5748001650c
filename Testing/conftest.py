"""Shared fixtures: the bundled sample pair and small generated pairs."""
import os

import pytest
import SimpleITK as sitk
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def sample_dir():
    from iterreg.resources import sample_pair_dir
    return sample_pair_dir()


@pytest.fixture(scope="session")
def sample_pair(sample_dir):
    from iterreg.sample_data import read_pair
    return read_pair(sample_dir)


@pytest.fixture(scope="session")
def small_pair():
    """A 48^3 generated pair with its ground truth (fast enough for many tests)."""
    from iterreg.sample_data import make_pair
    return make_pair(size=48, seed=3, magnitude_mm=10.0, n_landmarks=10)


def write(image: sitk.Image, path) -> str:
    sitk.WriteImage(image, str(path))
    return str(path)
