"""Network building blocks shared by the learned methods (pure PyTorch)."""
from .unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig"]
