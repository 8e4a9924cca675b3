"""Operator commands of the `faust` command line: `faust -A classify_app <command> --help`."""

from __future__ import annotations

from faust.cli import AppCommand

from classify_app.app import app, create_store_from, settings
from tables.migrations import MIGRATIONS, pending
from tables.migrations import migrate as apply_migrations


@app.command()
async def migrate(self: AppCommand) -> None:
    """Apply the pending MongoDB schema migrations, each exactly once (safe to run anywhere,
    any number of times, also while workers start)."""
    store = create_store_from(settings)
    if store is None:
        raise self.UsageError("CLASSIFY_MONGO_URI is empty: this deployment has no MongoDB store")
    try:
        waiting = await pending(store)
        ran = await apply_migrations(store)
        for migration in ran:
            self.say(f"applied {migration.version}: {migration.name}")
        skipped = len(waiting) - len(ran)
        self.say(
            f"{len(ran)} migrations applied"
            + (f", {skipped} applied by another runner meanwhile" if skipped > 0 else "")
            + f"; schema at version {max(m.version for m in MIGRATIONS)}"
        )
    finally:
        await store.close()
