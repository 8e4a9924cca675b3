"""`python -m classify_app worker` is the same as `faust -A classify_app worker`."""

# Faust's own commands first: ours of the same name (`send`) must be registered after them.
import faust.cli.faust  # noqa: F401

from classify_app.application import app


def main() -> None:
    """Console entry point: Faust's command line for this app."""
    app.main()


if __name__ == "__main__":
    main()
