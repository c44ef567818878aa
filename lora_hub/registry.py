"""The local registry: a SQLite index of the adapters that are here, for which base, from where.

It lives beside the Hugging Face cache (`$HF_HOME/lora-hub/registry.db`), or in `$LORA_HUB_HOME`. The database
runs in WAL mode and every change is one transaction, so concurrent processes see either the old or the new
entry, and a process killed mid-write leaves the previous state. The registry records where files are; the
files themselves stay in the Hugging Face cache (or wherever the user keeps them).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import RegistryError, RegistryUnusableError

SCHEMA_VERSION = 1
_COLUMNS = ("name", "repo_id", "revision", "commit_sha", "sha256", "path", "base_model", "ranks", "targets",
            "size", "source", "valid", "findings", "created", "updated")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name TEXT PRIMARY KEY, repo_id TEXT, revision TEXT, commit_sha TEXT, sha256 TEXT, path TEXT NOT NULL,
    base_model TEXT, ranks TEXT NOT NULL, targets TEXT NOT NULL, size INTEGER NOT NULL, source TEXT,
    valid INTEGER NOT NULL, findings TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_updated ON adapters (updated);
"""


@dataclass(frozen=True)
class RegistryEntry:
    """One adapter the registry knows.

    Attributes:
        name: The registry name: the repo id, with `@revision` when a revision was asked for.
        repo_id, revision, commit_sha: Where it came from on a Hub (None for local files).
        sha256: Of the adapter file's bytes.
        path: The adapter file (a lora-hub file) or folder (a PEFT adapter).
        ranks: Distinct ranks, sorted. targets: Distinct module names (the last path part), sorted.
        valid: False when it was kept despite validation errors (`force`); `findings` holds their codes.
        created, updated: Unix times of the first and the last record of this name.
    """

    name: str
    path: str
    repo_id: str | None = None
    revision: str | None = None
    commit_sha: str | None = None
    sha256: str | None = None
    base_model: str | None = None
    ranks: list[int] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    size: int = 0
    source: str | None = None
    valid: bool = True
    findings: list[str] = field(default_factory=list)
    created: float = 0.0
    updated: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_home() -> Path:
    """`$LORA_HUB_HOME`, else `lora-hub/` in the Hugging Face home (`$HF_HOME`, else `$XDG_CACHE_HOME/huggingface`,
    else `~/.cache/huggingface`)."""
    if os.environ.get("LORA_HUB_HOME"):
        return Path(os.environ["LORA_HUB_HOME"]).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return Path(hf_home).expanduser() / "lora-hub"


class Registry:
    """The registry database in `home` (default: `default_home()`), created on first use."""

    def __init__(self, home: str | os.PathLike[str] | None = None) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.path = self.home / "registry.db"

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"

    @contextmanager
    def _db(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection in WAL mode, schema created; with `write`, inside one IMMEDIATE transaction. Reading works
        on a registry the user may not write (a read-only home), and reading a registry that does not exist yet
        sees an empty one without creating anything.

        Raises:
            RegistryUnusableError: The database is damaged, not a database, a folder, or cannot be opened.
        """
        try:
            with self._connection(write) as db:
                if write:
                    db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    if write and db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
                if write:
                    db.execute("COMMIT")
        except sqlite3.Error as e:
            raise self._unusable(e) from e

    @contextmanager
    def _connection(self, write: bool) -> Iterator[sqlite3.Connection]:
        if self.path.is_dir():
            raise RegistryUnusableError(f"{self.path} is a folder, not the registry database: move it aside",
                                        path=self.path)
        if not write and not self.path.exists():
            db = sqlite3.connect(":memory:", isolation_level=None)  # nothing recorded yet: an empty registry
            read_only = False
        else:
            read_only = self.path.exists() and not _writable(self.path)
            if write and read_only:
                raise RegistryUnusableError("the registry is read-only here: listing works, changes need a registry "
                                            "you may write (set LORA_HUB_HOME)", path=self.path)
            if not read_only:
                try:
                    self.home.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise RegistryUnusableError(f"cannot create the registry folder {self.home}: {e.strerror}; "
                                                "point LORA_HUB_HOME at a folder you may write", path=self.home) from e
            db = _connect(self.path, read_only)
        try:
            if not read_only:
                _use_wal(db)
                db.execute("PRAGMA synchronous=FULL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RegistryError(f"the registry was written by a newer lora-hub (schema {version}); upgrade "
                                    "lora-hub or point LORA_HUB_HOME elsewhere", path=self.path)
            if version < SCHEMA_VERSION:
                if read_only:
                    raise RegistryUnusableError("the registry has no tables yet and is read-only here",
                                                path=self.path)
                db.execute("BEGIN IMMEDIATE")
                if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:  # another process may have won
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.execute("COMMIT")
            yield db
        finally:
            db.close()

    def _unusable(self, error: sqlite3.Error) -> RegistryUnusableError:
        text = str(error)
        if isinstance(error, sqlite3.OperationalError) and ("readonly" in text or "read-only" in text):
            return RegistryUnusableError(f"the registry is read-only here ({text}): listing works, changes need a "
                                         "registry you may write (set LORA_HUB_HOME)", path=self.path)
        if isinstance(error, sqlite3.OperationalError) and "locked" in text:
            return RegistryUnusableError(f"the registry stayed locked by another process for {_BUSY_SECONDS} s "
                                         "({text}); try again", path=self.path)
        return RegistryUnusableError(f"the registry database is damaged or not a SQLite database ({text}): move it "
                                     f"aside (mv {self.path} {self.path}.damaged) and pull the adapters again; "
                                     "lora-hub then starts a new registry", path=self.path)

    def record(self, entry: RegistryEntry) -> RegistryEntry:
        """Adds `entry` or replaces the one of the same name (keeping its creation time); returns what is stored."""
        now = time.time()
        with self._db(write=True) as db:
            row = db.execute("SELECT created FROM adapters WHERE name = ?", (entry.name,)).fetchone()
            values = entry.to_dict() | {"created": row[0] if row else now, "updated": now}
            db.execute(f"INSERT OR REPLACE INTO adapters ({', '.join(_COLUMNS)}) "
                       f"VALUES ({', '.join('?' * len(_COLUMNS))})", [_column(values[c]) for c in _COLUMNS])
        return RegistryEntry(**values)

    def list(self) -> list[RegistryEntry]:
        """Every entry, the most recently recorded first."""
        with self._db() as db:
            rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM adapters ORDER BY updated DESC, name").fetchall()
        return [_entry(row) for row in rows]

    def get(self, name: str) -> RegistryEntry:
        """The entry called `name`.

        Raises:
            RegistryError: No such entry.
        """
        with self._db() as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            known = ", ".join(e.name for e in self.list()[:10]) or "none"
            raise RegistryError(f"no adapter called {name!r} in the registry {self.path} (known: {known}); "
                                "pull it first (lora-hub pull REPO)")
        return _entry(row)

    def __contains__(self, name: object) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is not None

    def latest(self) -> RegistryEntry:
        """The most recently pulled or recorded entry.

        Raises:
            RegistryError: The registry is empty.
        """
        entries = self.list()
        if not entries:
            raise RegistryError(f"the registry {self.path} is empty: pull an adapter first (lora-hub pull REPO), "
                                "or name one")
        return entries[0]

    def resolve(self, name: str) -> Path:
        """The adapter file or folder of entry `name`.

        Raises:
            RegistryError: No such entry, or its file has been removed (pull it again).
        """
        entry = self.get(name)
        path = Path(entry.path)
        if not path.exists():
            raise RegistryError(f"the registry entry {name!r} points to {path}, which no longer exists: pull it "
                                f"again (lora-hub pull {entry.repo_id or name}) or remove it (lora-hub rm {name})")
        return path

    def remove(self, name: str) -> RegistryEntry:
        """Removes entry `name` (not its files) and returns it.

        Raises:
            RegistryError: No such entry.
        """
        with self._db(write=True) as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM adapters WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise RegistryError(f"no adapter called {name!r} in the registry {self.path}")
            db.execute("DELETE FROM adapters WHERE name = ?", (name,))
        return _entry(row)

    def check(self) -> None:
        """Raises RegistryError unless SQLite's integrity check passes."""
        with self._db() as db:
            result = db.execute("PRAGMA integrity_check").fetchone()[0]
        if result != "ok":
            raise RegistryError(f"the registry database is damaged: {result}", path=self.path)


_BUSY_SECONDS = 60


def _connect(path: Path, read_only: bool) -> sqlite3.Connection:
    """A connection to the database at `path`; read-only ones also work where SQLite cannot create its WAL index
    beside the file (a read-only folder): then without locking, which is safe for a registry nobody here writes."""
    if not read_only:
        return sqlite3.connect(path, timeout=_BUSY_SECONDS, isolation_level=None)
    uri = path.resolve().as_uri()
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=_BUSY_SECONDS, isolation_level=None)
    try:
        db.execute("PRAGMA user_version").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
    return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None)


def _use_wal(db: sqlite3.Connection) -> None:
    """Puts the database in WAL mode (a persistent setting, so usually nothing to do). Changing the journal mode
    takes an exclusive lock that SQLite's busy handler does not wait for, so it is retried here while another
    process holds the database (two processes opening a new registry at once)."""
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _writable(path: Path) -> bool:
    """Whether this process may change the database (the file, and its folder for the WAL files)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _column(value: Any) -> Any:
    if isinstance(value, list):
        return json.dumps(value)
    if isinstance(value, bool):
        return int(value)
    return value


def _entry(row: tuple) -> RegistryEntry:
    values = dict(zip(_COLUMNS, row, strict=True))
    for key in ("ranks", "targets", "findings"):
        values[key] = json.loads(values[key])
    values["valid"] = bool(values["valid"])
    return RegistryEntry(**values)
