"""What the installed package brings besides code: its default weights, their model card, and extras.

Where the default weights are looked for, first hit wins:

1. ``--weights`` on the command line (the caller's choice; not looked up here);
2. the environment variable ``DETECTOR_WEIGHTS``: a checkpoint file, which then *is* the default
   weights, or a folder holding files named like the defaults;
3. the package's own copy, ``detector/weights/`` (package data of the wheel; in the source tree its
   files are links into the checkout's ``weights/``);
4. the checkout's ``weights/`` folder beside ``detector/``, when the package runs from a source tree;
5. the user's download folder (:func:`user_weights_dir`), where ``detector download`` puts the CLIP
   encoder that the wheel does not carry.

A ``DETECTOR_WEIGHTS`` that names nothing is an error, not a silent fall-back to the bundled
weights: a user who set it expects those weights to score.

Optional packages (``pip install 'detector[heif]'`` and so on) are imported through
:func:`require`, which names the extra to install when one is missing.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

__all__ = ["DEFAULT_WEIGHTS_NAME", "ENV_VAR", "MissingExtraError", "default_weights_path", "model_card_summary",
           "require", "user_weights_dir", "weights_dirs"]

DEFAULT_WEIGHTS_NAME = "resnet50nodown_dev.safetensors"
ENV_VAR = "DETECTOR_WEIGHTS"
MODEL_CARD = "MODEL_CARD.md"

_PACKAGE = Path(__file__).resolve().parent


def _env_path() -> Path | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        raise ValueError(f"{ENV_VAR}={value}: no such file or folder")
    return path


def user_weights_dir() -> Path:
    """Where ``detector download`` writes: ``$XDG_CACHE_HOME/detector`` (default ``~/.cache/detector``)."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "detector"


def weights_dirs() -> list[Path]:
    """The folders searched for default weights, in order (see the module docstring).

    Raises ``ValueError`` if ``DETECTOR_WEIGHTS`` is set to a path that does not exist.
    """
    dirs = []
    env = _env_path()
    if env is not None:
        dirs.append(env if env.is_dir() else env.parent)
    dirs.append(_PACKAGE / "weights")
    checkout = _PACKAGE.parent
    if (checkout / "pyproject.toml").is_file():  # a source tree, not site-packages
        dirs.append(checkout / "weights")
    dirs.append(user_weights_dir())
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d not in unique:
            unique.append(d)
    return unique


def default_weights_path(name: str = DEFAULT_WEIGHTS_NAME) -> Path | None:
    """The checkpoint file ``name`` from the first folder of :func:`weights_dirs` holding it, or None.

    A ``DETECTOR_WEIGHTS`` that is a file answers for the default name whatever it is called.
    """
    env = _env_path()
    if env is not None and env.is_file() and name == DEFAULT_WEIGHTS_NAME:
        return env
    for folder in weights_dirs():
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def model_card_summary(weights: str | os.PathLike) -> str | None:
    """The first paragraph (after the title) of the ``MODEL_CARD.md`` beside ``weights``, or None.

    The cards of this project open with the weights' limits; reports show them next to the scores.
    """
    card = Path(weights).resolve().parent / MODEL_CARD
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.strip().splitlines()]
        if lines and not lines[0].startswith(("#", "|", "```")):
            return " ".join(lines)
    return None


class MissingExtraError(ImportError, ValueError):
    """An optional package is not installed; the message says which extra brings it.

    Also a ``ValueError``, so that commands report it as a bad request in one line.
    """


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional ``module``, or raise :class:`MissingExtraError` naming ``detector[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(
            f"{purpose} needs the optional package {module.split('.')[0]}: pip install 'detector[{extra}]'"
        ) from None
