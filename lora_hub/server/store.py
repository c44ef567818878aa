"""The server's storage: immutable objects on disk by sha256, and repositories, commits, refs and tokens in SQLite.

A commit is a full listing of its files (path -> object), stored with the commit, so every old revision stays
resolvable without walking history. Objects are written to a temporary file, checked, then renamed into place;
a commit becomes visible in one transaction that also moves its branch. A failed upload or commit therefore never
leaves anything visible, only (at worst) an unreferenced object.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
REPO_TYPES = ("model", "dataset", "space")
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (token_sha256 TEXT PRIMARY KEY, user TEXT NOT NULL, write INTEGER NOT NULL,
                                   created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS repos (id INTEGER PRIMARY KEY, type TEXT NOT NULL, namespace TEXT NOT NULL,
                                  name TEXT NOT NULL, private INTEGER NOT NULL, created REAL NOT NULL,
                                  UNIQUE (type, namespace, name));
CREATE TABLE IF NOT EXISTS commits (repo INTEGER NOT NULL REFERENCES repos(id), oid TEXT NOT NULL, parent TEXT,
                                    title TEXT NOT NULL, message TEXT NOT NULL, author TEXT NOT NULL,
                                    date REAL NOT NULL, files TEXT NOT NULL, PRIMARY KEY (repo, oid));
CREATE TABLE IF NOT EXISTS refs (repo INTEGER NOT NULL REFERENCES repos(id), name TEXT NOT NULL,
                                 kind TEXT NOT NULL, oid TEXT NOT NULL, PRIMARY KEY (repo, name));
CREATE TABLE IF NOT EXISTS repo_objects (repo INTEGER NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (repo, sha256))
    WITHOUT ROWID;
"""
SCHEMA_VERSION = 2
"""2 added repo_objects: which objects each repository may reference (filled from old commits on upgrade)."""


class StoreError(Exception):
    """A request the store refuses: `status` is the HTTP status, `code` the Hub's X-Error-Code (if any)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(frozen=True)
class User:
    name: str
    write: bool


@dataclass(frozen=True)
class Repo:
    id: int
    type: str
    namespace: str
    name: str
    private: bool
    created: float

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit: its object (sha256), size, git blob oid, and whether it is stored as LFS."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return LFS_POINTER.format(oid=self.sha256, size=self.size).encode()

    @property
    def tree_oid(self) -> str:
        """What the Hub lists as the file's oid: the git sha1 of the file, or of its LFS pointer."""
        return git_blob_sha1(self.pointer) if self.lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    author: str
    date: float
    files: dict[str, FileEntry]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_name(part: str, what: str) -> str:
    if not _NAME.match(part) or ".." in part:
        raise StoreError(400, f"invalid {what} {part!r}: use letters, digits, '-', '_' and '.', at most 96 "
                              "characters, starting and ending with a letter or digit")
    return part


def check_path(path: str) -> str:
    """A file path inside a repository that every client can download and store: relative, '/'-separated, no '.',
    '..' or empty parts, no backslash, no control character, no part that Windows reads as a drive ('C:x'), and no
    part over 255 bytes (what file systems hold); huggingface_hub refuses to download the rest.

    Raises:
        StoreError: 400, naming the path and the rule.
    """
    parts = path.split("/")
    problem = None
    if not path or len(path.encode("utf-8", "surrogatepass")) > 1024:
        problem = "paths are 1 to 1024 bytes long"
    elif path.startswith("/") or any(part in ("", ".", "..") for part in parts):
        problem = "paths are relative and hold no '.', '..' or empty parts"
    elif "\\" in path or _CONTROL.search(path):
        problem = "paths hold no backslash and no control character"
    elif any(PureWindowsPath(part).drive for part in parts):
        problem = "no part of a path may look like a Windows drive ('C:...')"
    elif any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in parts):
        problem = "each part of a path is at most 255 bytes"
    if problem:
        raise StoreError(400, f"invalid file path {path[:200]!r} in repository: {problem}")
    return path


def _check_no_file_folder_clash(files: Mapping[str, FileEntry]) -> None:
    """No file may have the path of a folder of another file ('coll' beside 'coll/x'): no client can store both."""
    for path in files:
        parent = path
        while "/" in parent:
            parent = parent.rsplit("/", 1)[0]
            if parent in files:
                raise StoreError(400, f"invalid file path {parent!r} in repository: it is a file and also the "
                                      f"folder of {path!r}")


class Store:
    """Blobs and metadata under `root`: `objects/aa/<sha256>`, `tmp/`, and `hub.db`."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        for folder in (self.objects, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "hub.db"
        with self._write() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                for repo, text in db.execute("SELECT repo, files FROM commits").fetchall():
                    db.executemany("INSERT OR IGNORE INTO repo_objects VALUES (?, ?)",
                                   [(repo, entry[0]) for entry in json.loads(text).values()])
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # --- tokens ---------------------------------------------------------------------------------------------------

    def add_token(self, user: str, *, write: bool = True) -> str:
        """A new token for `user` (read-only unless `write`). Only its sha256 is stored: keep the returned value."""
        check_name(user, "user name")
        token = "hf_" + secrets.token_urlsafe(30)
        with self._write() as db:
            db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?)", (_token_key(token), user, int(write), time.time()))
        return token

    def user(self, token: str | None) -> User | None:
        if not token:
            return None
        with self._read() as db:
            row = db.execute("SELECT user, write FROM tokens WHERE token_sha256 = ?", (_token_key(token),)).fetchone()
        return User(row[0], bool(row[1])) if row else None

    # --- repositories ---------------------------------------------------------------------------------------------

    def create_repo(self, repo_type: str, namespace: str, name: str, *, private: bool) -> tuple[Repo, bool]:
        """Creates the repository with an empty initial commit on `main`; returns it and whether it is new."""
        check_name(namespace, "namespace")
        check_name(name, "repository name")
        with self._write() as db:
            existing = _repo_row(db, repo_type, namespace, name)
            if existing:
                return existing, False
            now = time.time()
            cursor = db.execute("INSERT INTO repos (type, namespace, name, private, created) VALUES (?, ?, ?, ?, ?)",
                                (repo_type, namespace, name, int(private), now))
            repo = Repo(cursor.lastrowid, repo_type, namespace, name, private, now)
            oid = _insert_commit(db, repo.id, None, "initial commit", "", namespace, now, {})
            db.execute("INSERT INTO refs VALUES (?, 'main', 'branch', ?)", (repo.id, oid))
            return repo, True

    def repo(self, repo_type: str, namespace: str, name: str) -> Repo | None:
        with self._read() as db:
            return _repo_row(db, repo_type, namespace, name)

    def repo_by_id(self, repo_id: int) -> Repo | None:
        with self._read() as db:
            row = db.execute("SELECT type, namespace, name FROM repos WHERE id = ?", (repo_id,)).fetchone()
            return _repo_row(db, *row) if row else None

    def delete_repo(self, repo: Repo) -> None:
        with self._write() as db:
            for table in ("refs", "commits", "repo_objects"):
                db.execute(f"DELETE FROM {table} WHERE repo = ?", (repo.id,))
            db.execute("DELETE FROM repos WHERE id = ?", (repo.id,))

    def set_private(self, repo: Repo, private: bool) -> None:
        with self._write() as db:
            db.execute("UPDATE repos SET private = ? WHERE id = ?", (int(private), repo.id))

    # --- revisions ------------------------------------------------------------------------------------------------

    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, tag, `refs/heads/x`, `refs/tags/x`, `refs/pr/N`, or a full commit sha of this repository."""
        with self._read() as db:
            return _resolve(db, repo, revision)

    def refs(self, repo: Repo) -> list[tuple[str, str, str]]:
        """(name, kind, commit) of every branch, tag and pull request."""
        with self._read() as db:
            return db.execute("SELECT name, kind, oid FROM refs WHERE repo = ? ORDER BY name", (repo.id,)).fetchall()

    def history(self, repo: Repo, revision: str) -> list[Commit]:
        with self._read() as db:
            commit = _resolve(db, repo, revision)
            out = [commit]
            while commit.parent:
                commit = _commit(db, repo.id, commit.parent)
                out.append(commit)
            return out

    def create_ref(self, repo: Repo, name: str, kind: str, revision: str) -> None:
        with self._write() as db:
            if db.execute("SELECT 1 FROM refs WHERE repo = ? AND name = ?", (repo.id, name)).fetchone():
                raise StoreError(409, f"{kind} {name!r} already exists")
            oid = _resolve(db, repo, revision).oid
            db.execute("INSERT INTO refs VALUES (?, ?, ?, ?)", (repo.id, name, kind, oid))

    def delete_ref(self, repo: Repo, name: str, kind: str) -> None:
        if kind == "branch" and name == "main":
            raise StoreError(403, "the main branch cannot be deleted")
        with self._write() as db:
            if not db.execute("DELETE FROM refs WHERE repo = ? AND name = ? AND kind = ?",
                              (repo.id, name, kind)).rowcount:
                raise StoreError(404, f"no {kind} {name!r}", "RevisionNotFound")

    def commit(self, repo: Repo, revision: str, *, title: str, message: str, author: str,
               parent: str | None, operations: list[tuple[str, str, FileEntry | None]],
               create_pr: bool = False) -> tuple[str, str | None]:
        """Applies ("add"|"delete"|"delete_folder", path, entry) operations on top of `revision` in one transaction.

        Returns:
            The new commit's oid, and the pull request ref when `create_pr`.
        """
        with self._write() as db:
            head = _resolve(db, repo, revision)
            if parent is not None and parent != head.oid:
                raise StoreError(412, f"the branch moved: its head is {head.oid}, not the parent commit {parent}; "
                                      "pull and commit again")
            files = dict(head.files)
            for kind, path, entry in operations:
                if kind == "add":
                    files[path] = entry
                elif kind == "delete":
                    if files.pop(path, None) is None:
                        raise StoreError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                else:
                    prefix = path.rstrip("/") + "/"
                    gone = [p for p in files if p.startswith(prefix)]
                    if not gone:
                        raise StoreError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    for p in gone:
                        del files[p]
            _check_no_file_folder_clash(files)
            for kind, path, entry in operations:
                if kind == "add" and not _held(db, repo, entry.sha256):
                    raise StoreError(400, f"Your push was rejected because an LFS pointer pointed to a file that "
                                          f"does not exist: {path} (sha256 {entry.sha256}); upload it first")
            oid = _insert_commit(db, repo.id, head.oid, title, message, author, time.time(), files)
            if create_pr:
                count = db.execute("SELECT COUNT(*) FROM refs WHERE repo = ? AND kind = 'pr'", (repo.id,)).fetchone()
                ref = f"refs/pr/{count[0] + 1}"
                db.execute("INSERT INTO refs VALUES (?, ?, 'pr', ?)", (repo.id, ref, oid))
                return oid, ref
            branch = _branch_of(db, repo, revision)
            db.execute("UPDATE refs SET oid = ? WHERE repo = ? AND name = ?", (oid, repo.id, branch))
            return oid, None

    # --- objects --------------------------------------------------------------------------------------------------

    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        """Whether the object is stored, for any repository (not something to tell a client: see `holds`)."""
        path = self.object_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def holds(self, repo: Repo, sha256: str, size: int) -> bool:
        """Whether `repo` may reference the object: one of its commits does, or it was uploaded for it."""
        with self._read() as db:
            return _held(db, repo, sha256) and self.has_object(sha256, size)

    def _record(self, repo: Repo, sha256: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO repo_objects VALUES (?, ?)", (repo.id, sha256))

    @contextmanager
    def new_object(self) -> Iterator[_ObjectWriter]:
        """A temporary file in tmp/ that `ObjectWriter.finish` renames into objects/ once its hash checks out."""
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        writer = _ObjectWriter(self, os.fdopen(fd, "wb"), Path(name))
        try:
            yield writer
        finally:
            writer.file.close()
            Path(name).unlink(missing_ok=True)

    def put_bytes(self, data: bytes, repo: Repo) -> FileEntry:
        """Stores a regular (non-LFS) file, whose content arrived inside a commit to `repo`."""
        with self.new_object() as writer:
            writer.write(data)
            entry = writer.finish(repo=repo)
        return FileEntry(entry.sha256, entry.size, git_blob_sha1(data), False)


class _ObjectWriter:
    def __init__(self, store: Store, file, path: Path) -> None:
        self.store, self.file, self.path = store, file, path
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.sha256.update(chunk)
        self.size += len(chunk)

    def finish(self, *, repo: Repo, expect_sha256: str | None = None, expect_size: int | None = None) -> FileEntry:
        """Checks the hash and size, renames the file into objects/ and records it for `repo`; returns it as an LFS
        entry."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        digest = self.sha256.hexdigest()
        if expect_size is not None and self.size != expect_size:
            raise StoreError(400, f"size mismatch: received {self.size} bytes, expected {expect_size}")
        if expect_sha256 is not None and digest != expect_sha256:
            raise StoreError(400, f"sha256 mismatch: received {digest}, expected {expect_sha256}")
        target = self.store.object_path(digest)
        target.parent.mkdir(exist_ok=True)
        os.replace(self.path, target)
        self.store._record(repo, digest)
        return lfs_entry(digest, self.size)


def lfs_entry(sha256: str, size: int) -> FileEntry:
    return FileEntry(sha256, size, "", True)


def _held(db: sqlite3.Connection, repo: Repo, sha256: str) -> bool:
    return db.execute("SELECT 1 FROM repo_objects WHERE repo = ? AND sha256 = ?", (repo.id, sha256)).fetchone() \
        is not None


def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _repo_row(db: sqlite3.Connection, repo_type: str, namespace: str, name: str) -> Repo | None:
    row = db.execute("SELECT id, type, namespace, name, private, created FROM repos "
                     "WHERE type = ? AND namespace = ? AND name = ?", (repo_type, namespace, name)).fetchone()
    return Repo(row[0], row[1], row[2], row[3], bool(row[4]), row[5]) if row else None


def _insert_commit(db: sqlite3.Connection, repo: int, parent: str | None, title: str, message: str, author: str,
                   date: float, files: Mapping[str, FileEntry]) -> str:
    listing = {path: [e.sha256, e.size, e.git_oid, e.lfs] for path, e in sorted(files.items())}
    text = json.dumps(listing, separators=(",", ":"))
    oid = hashlib.sha1(json.dumps([repo, parent, title, message, author, date, text]).encode()).hexdigest()
    db.execute("INSERT INTO commits VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
               (repo, oid, parent, title, message, author, date, text))
    return oid


def _commit(db: sqlite3.Connection, repo: int, oid: str) -> Commit:
    row = db.execute("SELECT oid, parent, title, message, author, date, files FROM commits WHERE repo = ? AND oid = ?",
                     (repo, oid)).fetchone()
    files = {path: FileEntry(e[0], e[1], e[2], e[3]) for path, e in json.loads(row[6]).items()}
    return Commit(row[0], row[1], row[2], row[3], row[4], row[5], files)


def _ref_name(revision: str) -> str:
    for prefix in ("refs/heads/", "refs/tags/"):
        if revision.startswith(prefix):
            return revision[len(prefix):]
    return revision


def _resolve(db: sqlite3.Connection, repo: Repo, revision: str) -> Commit:
    row = db.execute("SELECT oid FROM refs WHERE repo = ? AND name = ?", (repo.id, _ref_name(revision))).fetchone()
    if row:
        return _commit(db, repo.id, row[0])
    if _SHA1.match(revision) and db.execute("SELECT 1 FROM commits WHERE repo = ? AND oid = ?",
                                             (repo.id, revision)).fetchone():
        return _commit(db, repo.id, revision)
    raise StoreError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def _branch_of(db: sqlite3.Connection, repo: Repo, revision: str) -> str:
    name = _ref_name(revision)
    row = db.execute("SELECT kind FROM refs WHERE repo = ? AND name = ?", (repo.id, name)).fetchone()
    if not row or row[0] not in ("branch", "pr"):
        raise StoreError(400, f"cannot commit to {revision!r}: commit to a branch (or open a pull request)")
    return name
