"""The ``gcmoe`` command line. Each command parses, calls one library function, and reports.

Heavy libraries (torch, scanpy) are imported inside the commands so ``gcmoe --help`` answers at once. The
commands live by job: :mod:`~gcmoe.cli.runs` (demo, cv, train, predict), :mod:`~gcmoe.cli.data` (simulate,
convert, extract, prior) and :mod:`~gcmoe.cli.figures` (plot, report, list); :mod:`~gcmoe.cli._app` holds
what they share.
"""

from __future__ import annotations

# each module registers its commands on ``app``, in the order --help lists them
from gcmoe.cli import runs, data, figures  # noqa: F401, I001
from gcmoe.cli._app import app

__all__ = ["app", "main"]


def main() -> None:
    """The ``gcmoe`` console script."""
    app()


if __name__ == "__main__":
    main()
