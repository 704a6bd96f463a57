"""The argparse types of every number and list on the command line: each value is checked where it is
parsed, so a bad one is argparse's one line naming the option (`argument --rounds: ...`), exit 2.

Bounds keep what reaches TVM, PyTorch and the OS sane (a thread count TVM can start, a batch that fits
in memory); a comma list never has empty or repeated items.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Callable

MAX_BATCH = 4096
MAX_CLASSES = 1_000_000
MAX_COUNT = 10_000_000  # rounds, trials, samples, epochs: large, but finite and far from int64
PRECISIONS = ("float32", "float16", "int8")


def integer(low: int, high: int, what: str = "a whole number") -> Callable[[str], int]:
    """A whole number in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {what} from {low} to {high}, not '{text}'") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"takes {what} from {low} to {high}, not {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def number(low: float, high: float) -> Callable[[str], float]:
    """A finite number in [low, high]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes a number from {low:g} to {high:g}, not '{text}'") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"takes a number from {low:g} to {high:g}, not {text.strip()}")
        return value

    parse.__name__ = "number"
    return parse


def threads(text: str) -> int:
    """A CPU thread count: 1 up to this machine's logical CPUs (TVM's pool cannot start far more)."""
    return integer(1, os.cpu_count() or 1, "a thread count")(text)


def seconds(text: str) -> float:
    """'90s', '10m', '1h30m' or plain seconds: a positive, finite time in seconds (ValueError otherwise)."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        value = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"takes a duration such as 90s, 10m or 1h30m, not '{text}'")
        value = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if not 0 < value < 1e9:
        raise ValueError(f"takes a duration longer than 0s (and shorter than 30 years), not '{text}'")
    return value


def duration(text: str) -> float:
    """seconds() as an argparse type."""
    try:
        return seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def comma_list(item: Callable[[str], object] = str, what: str = "values") -> Callable[[str], list]:
    """A non-empty comma-separated list of `item`s, none empty, none twice."""
    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not text.strip() or any(not part for part in parts):
            raise argparse.ArgumentTypeError(f"takes comma-separated {what} with none empty, not '{text}'")
        values = [item(part) for part in parts]
        repeated = next((part for i, part in enumerate(parts) if part in parts[:i]), None)
        if repeated is not None:
            raise argparse.ArgumentTypeError(f"lists '{repeated}' twice: name each once")
        return values

    parse.__name__ = "list"
    return parse


def choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"takes {', '.join(choices)}, not '{text}'")
        return text

    parse.__name__ = "choice"
    return parse


def targets(text: str) -> list[str]:
    """Target specs: a JSON TVM target dict, taken whole when it starts with '{', else comma-separated
    preset names and .toml paths."""
    if text.lstrip().startswith("{"):
        return [text.strip()]
    return comma_list(str, "target names")(text)


batches = comma_list(integer(1, MAX_BATCH, "a batch size"), "batch sizes")
precisions = comma_list(choice(*PRECISIONS), "precisions")
positive = integer(1, MAX_COUNT)


def preprocessing(key: str, what: str) -> Callable[[str], object]:
    """A --size/--mean/--std/--interpolation/--crop-pct value, checked as the same field of a --preprocessing file
    (data.PreprocessingFile): `what` says what the option takes."""
    def parse(text: str):
        from pydantic import ValidationError

        from .data import PreprocessingFile
        from .formats import describe

        value: object = text.strip()
        if key in ("size", "mean", "std"):
            parts = [part.strip() for part in text.split(",")]
            try:
                value = [int(p, 10) if key == "size" else float(p) for p in parts]
            except ValueError:
                raise argparse.ArgumentTypeError(f"takes {what}, not '{text}'") from None
            value = value * 2 if key == "size" and len(value) == 1 else value
        elif key == "crop_pct":
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"takes {what}, not '{text}'") from None
        try:
            PreprocessingFile.model_validate({key: value})
        except ValidationError as exc:
            problem = describe(PreprocessingFile, {**exc.errors()[0], "loc": ()})
            raise argparse.ArgumentTypeError(f"takes {what}: {problem}") from None
        return tuple(value) if isinstance(value, list) else value

    parse.__name__ = key
    return parse
