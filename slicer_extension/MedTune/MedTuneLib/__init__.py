"""Qt-free logic of the MedTune Slicer module (importable with slicer-core alone, tested in CI)."""
