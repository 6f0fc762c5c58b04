"""sapo: Self-Augmented Preference Optimization (Yin et al., arXiv 2405.20830) on the Hugging Face stack."""

from sapo.config import SAPOConfig
from sapo.trainer import SAPOTrainer

__all__ = ["SAPOConfig", "SAPOTrainer"]
__version__ = "0.1.0"
