"""The local MLflow server's process: `mlflow server`, its SQLite database made whole before it opens it.

MLflow creates a new database in place, by migrations that SQLite runs without one enclosing transaction
(pysqlite does not wrap DDL in one). A server stopped during that first boot (the command that started it
met a user error, Ctrl-C, a closed terminal) left a database that no later server could open ("table
_alembic_tmp_experiments already exists"), and every later command's server died at boot. Here a new
database is built in a file beside it and moved into place only when complete: the path holds no
database or a whole one.

Run as `python -m sweep.local_mlflow server ARGS...`: MLflow's own command line, in this process.
Imports nothing of fwsweep (the server needs neither torch nor Ray).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from pathlib import Path

BUILDING = ".building-"  # mlflow.db.building-PID: a database being made by process PID
SQLITE = "sqlite:///"
READ_TIMEOUT_S = 30.0  # how long a read of the database waits for another process's write to end


def database_of(argv: list[str]) -> Path | None:
    """The SQLite file of `mlflow server`'s --backend-store-uri, or None for any other store."""
    if "--backend-store-uri" not in argv[:-1]:
        return None
    uri = argv[argv.index("--backend-store-uri") + 1]
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


def table_count(db: Path) -> int | None:
    """How many tables `db` holds (0: missing or empty), or None when SQLite cannot read it."""
    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=READ_TIMEOUT_S)) as con:
            return con.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
    except sqlite3.DatabaseError:
        return None


def make_whole(db: Path) -> None:
    """Create `db` with MLflow's tables at its newest schema, unless it already holds tables (an existing
    store is MLflow's to open, or the caller's to reject: sweep.tracking.store_damage)."""
    _remove_abandoned(db)
    if table_count(db) != 0:
        return
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

    part = db.with_name(f"{db.name}{BUILDING}{os.getpid()}")
    engine = create_sqlalchemy_engine(f"{SQLITE}{part}")
    try:
        _initialize_tables(engine)  # what MLflow's store does on a new database, here on the side file
    finally:
        engine.dispose()
    os.replace(part, db)  # an empty file (no tables) is replaced too


def _remove_abandoned(db: Path) -> None:
    """Side files (and their journals) of builds whose process is gone: stopped mid-way."""
    for path in db.parent.glob(f"{db.name}{BUILDING}*"):
        pid = path.name.removeprefix(f"{db.name}{BUILDING}").split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main() -> None:
    argv = sys.argv[1:]
    db = database_of(argv)
    if db is not None:
        make_whole(db)
    from mlflow.cli import cli

    cli.main(args=argv, prog_name="mlflow")


if __name__ == "__main__":
    main()
