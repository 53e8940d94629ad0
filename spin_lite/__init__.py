"""spin_lite: SPIN (Self-Play Fine-Tuning, arXiv 2401.01335) with LoRA/QLoRA adapters on one GPU or a CPU."""
from .config import SpinConfig, load_config
from .loss import spin_loss

__version__ = "0.1.0"
__all__ = ["SpinConfig", "load_config", "spin_loss", "__version__"]
