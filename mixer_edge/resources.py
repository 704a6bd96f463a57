"""Where the data folders (`targets/`, `calibration/`) are: inside the wheel, or beside the package in a checkout."""

from pathlib import Path


def data_dir(name: str) -> Path:
    packaged = Path(__file__).parent / name  # the wheel puts the top-level folder here
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / name
