"""Entry point of ``mlflow run training -e train``: ``insertrec train`` with the project's parameters.

MLproject parameters always have a value, so ``cutoff`` left at its empty
default is dropped here rather than passed as an empty string (an empty
``register_as`` does go through: it means "do not register"); numbers come in as MLflow formats floats ("60.0") and go out as the
integers the CLI expects. The run MLflow created (``MLFLOW_RUN_ID``) is the one
``insertrec train`` logs into.
"""

from __future__ import annotations

import sys

from insertrec.cli import main

_INTEGERS = {"--horizon-days", "--seed"}
_OMITTED_WHEN_EMPTY = {"--cutoff"}


def train_argv(args: list[str]) -> list[str]:
    """``--flag value`` pairs from MLflow to the arguments of ``insertrec train``."""
    if len(args) % 2:
        raise SystemExit(f"train.py: expected --flag value pairs, got {args!r}")
    out = ["train"]
    for flag, value in zip(args[::2], args[1::2]):
        if value == "" and flag in _OMITTED_WHEN_EMPTY:
            continue
        out += [flag, str(int(float(value))) if flag in _INTEGERS else value]
    return out


if __name__ == "__main__":
    sys.exit(main(train_argv(sys.argv[1:])))
