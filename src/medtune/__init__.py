"""MedTune: transfer learning for medical imaging (fine-tune, evaluate, export, deploy)."""

__version__ = "0.1.0"
