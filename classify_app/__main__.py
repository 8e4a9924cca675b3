"""`python -m classify_app worker` (and the `classify-app` command) is the same as
`faust -A classify_app worker`."""

from __future__ import annotations

import sys


def main() -> None:
    """Console entry point: Faust's command line for this app."""
    try:
        # Faust's own commands first: ours of the same name (`send`) are registered after them.
        import faust.cli.faust  # noqa: F401
    except ModuleNotFoundError:
        sys.exit(
            "classify-app: the command line needs the worker's dependencies: "
            "pip install 'classify-app[worker]' (the SDK alone needs none)"
        )
    from classify_app.application import app

    app.main()


if __name__ == "__main__":
    main()
