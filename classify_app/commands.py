"""Operator commands of the `faust` command line: `faust -A classify_app <command> --help`."""

from __future__ import annotations

from faust.cli import AppCommand, option

from classify_app.app import app, create_store_from, settings
from classify_app.dead_letters import replay_dead_letters
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


@app.command(
    option("--reason", default=None, help="Replay only dead letters with this reason code."),
    option("--limit", type=int, default=0, help="Replay at most this many (0: all)."),
    option("--dry-run", is_flag=True, default=False, help="List them, publish nothing."),
)
async def dlq_replay(self: AppCommand, reason: str | None, limit: int, dry_run: bool) -> None:
    """Re-publish dead-lettered events to the topics they came from.

    Reads the dead-letter topic from where the last replay stopped (consumer group
    `classify-app-dlq-replay`) up to its current end, publishes each payload again with its
    original key, and commits, so running it twice does not replay twice. Fix the cause first
    (a producer bug, a MongoDB conflict): an event that still fails is dead-lettered again.
    """
    bootstrap = ",".join(f"{url.host}:{url.port or 9092}" for url in app.conf.broker)
    replayed, skipped = await replay_dead_letters(
        bootstrap, settings.dead_letter_topic, reason=reason, limit=limit, dry_run=dry_run
    )
    for letter in replayed:
        self.say(
            f"{'would replay' if dry_run else 'replayed'} {letter.reason}: "
            f"{letter.topic}[{letter.partition}]@{letter.offset}"
        )
    self.say(
        f"{len(replayed)} dead letters {'to replay' if dry_run else 'replayed'}, {skipped} skipped"
    )
