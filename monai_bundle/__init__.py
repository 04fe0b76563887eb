"""The MedTune MONAI bundle (configs, docs). Installed as ``medtune.bundle``; the folder is a Model-Zoo
style bundle usable with ``python -m monai.bundle run --config_file ...``."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "configs"
