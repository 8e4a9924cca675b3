"""`python -m classify_app worker` is the same as `faust -A classify_app worker`."""

from classify_app.application import app


def main() -> None:
    """Console entry point: Faust's command line for this app."""
    app.main()


if __name__ == "__main__":
    main()
