"""Local review-app accounts: roles, argon2 password hashes, server-side sessions, throttling.

Everything lives in the service database (tables in :mod:`cds_service.orm`, migration
``0002_review_accounts``), so every worker and every instance behind a load balancer agrees on
who is signed in, a revoked session ends everywhere at once, and a lock-out cannot be dodged by
hitting another worker. The browser holds only a random token; the database holds its SHA-256,
so a copy of the database signs nobody in.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from cds_service.orm import ReviewSession, SignInThrottle, UserAccount, utcnow
from her2low.core.enums import LabelledEnum
from her2low.core.settings import Settings

MIN_PASSWORD_LENGTH = 12
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{1,63}$")
#: Refresh ``last_seen_at`` at most this often (one write per request would serialise SQLite).
_TOUCH_EVERY = timedelta(seconds=30)


class Role(LabelledEnum):
    """What a signed-in user may do (see :data:`PERMISSIONS` for who does what)."""

    RADIOLOGIST = "radiologist", "Radiologist"
    ONCOLOGIST = "oncologist", "Oncologist"
    PATHOLOGIST = "pathologist", "Pathologist"
    COORDINATOR = "board-coordinator", "Board coordinator"
    ADMIN = "admin", "Administrator"


class Permission(StrEnum):
    """Acts of the review app that not every role may perform."""

    ENTER_DESCRIPTORS = "enter-descriptors"  # includes confirming the ROI
    RECORD_DECISION = "record-decision"
    ENTER_PATHOLOGY = "enter-pathology"
    MANAGE_USERS = "manage-users"
    READ_AUDIT = "read-audit"
    SET_BOARD_DATE = "set-board-date"  # put a case on a tumour-board date


#: Issue 13: radiologists enter descriptors and confirm ROIs; oncologists and radiologists record
#: board decisions; pathologists enter the HER2 result; admins manage users and read the audit.
#: Board coordinators prepare the meeting: they put cases on a board date but change nothing else
#: (coordinators, radiologists and oncologists set board dates). Every signed-in
#: role may read the worklist, the cases and the model card.
PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.RADIOLOGIST: frozenset(
        {Permission.ENTER_DESCRIPTORS, Permission.RECORD_DECISION, Permission.SET_BOARD_DATE}
    ),
    Role.ONCOLOGIST: frozenset({Permission.RECORD_DECISION, Permission.SET_BOARD_DATE}),
    Role.PATHOLOGIST: frozenset({Permission.ENTER_PATHOLOGY}),
    Role.COORDINATOR: frozenset({Permission.SET_BOARD_DATE}),
    Role.ADMIN: frozenset({Permission.MANAGE_USERS, Permission.READ_AUDIT}),
}


class AccountError(ValueError):
    """A bad user name, role or password, or an unknown user (message safe to show)."""


class SignInRefused(Exception):
    """Sign-in failed; ``locked`` says whether throttling (not the password) refused it."""

    def __init__(self, message: str, *, locked: bool = False) -> None:
        super().__init__(message)
        self.locked = locked


@dataclass(frozen=True)
class SessionPolicy:
    idle: timedelta = timedelta(minutes=30)
    absolute: timedelta = timedelta(hours=12)
    max_failures: int = 5
    max_failures_per_address: int = 20
    lockout: timedelta = timedelta(minutes=15)


@dataclass(frozen=True)
class SignedIn:
    """The user behind a valid session (what views and the audit trail use)."""

    user_id: int
    username: str
    display_name: str
    role: Role

    def can(self, permission: Permission) -> bool:
        return permission in PERMISSIONS[self.role]

    @property
    def label(self) -> str:
        return self.display_name or self.username


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_password(password: str) -> str:
    """The password if acceptable; :class:`AccountError` otherwise."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > 1024:
        raise AccountError("a password may have at most 1024 characters")
    return password


def check_username(username: str) -> str:
    name = username.strip().lower()
    if not _USERNAME.match(name):
        raise AccountError(
            "a user name is 2-64 characters: lower-case letters, digits, '.', '_', '@', '-'"
        )
    return name


def new_password() -> str:
    """A random password (~120 bits) for demo and reset use."""
    return secrets.token_urlsafe(15)


class Accounts:
    """Users, sessions and throttling on a session factory of the service database."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        policy: SessionPolicy | None = None,
        *,
        hasher: PasswordHasher | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.policy = policy or SessionPolicy()
        self.hasher = hasher or PasswordHasher()  # argon2id, RFC 9106 low-memory profile
        self.clock = clock

    @functools.cached_property
    def _dummy_hash(self) -> str:
        """Verified against for unknown users, so their sign-in takes as long as a real one."""
        return self.hasher.hash(secrets.token_hex(16))

    # --- users --------------------------------------------------------------------------------
    def add_user(
        self, username: str, role: Role | str, password: str, display_name: str = ""
    ) -> UserAccount:
        name = check_username(username)
        try:
            coerced = Role(role)
        except ValueError:
            raise AccountError(
                f"unknown role {role!r}; one of {', '.join(r.value for r in Role)}"
            ) from None
        digest = self.hasher.hash(check_password(password))
        with self.sessions.begin() as s:
            if s.scalar(select(UserAccount.id).where(UserAccount.username == name)) is not None:
                raise AccountError(f"user {name} exists")
            user = UserAccount(
                username=name,
                role=coerced.value,
                password_hash=digest,
                display_name=display_name.strip()[:128],
                active=True,
            )
            s.add(user)
        return user

    def users(self) -> list[UserAccount]:
        with self.sessions() as s:
            return list(s.scalars(select(UserAccount).order_by(UserAccount.username)))

    def user(self, username: str) -> UserAccount | None:
        with self.sessions() as s:
            return s.scalar(
                select(UserAccount).where(UserAccount.username == username.strip().lower())
            )

    def set_active(self, username: str, active: bool) -> None:
        """Disable (ending every session of the user at once) or re-enable an account."""
        with self.sessions.begin() as s:
            user = self._get(s, username)
            user.active = active
            if not active:
                self._revoke_user(s, user.id)

    def reset_password(self, username: str, password: str) -> None:
        """Set a new password; every existing session of the user ends."""
        digest = self.hasher.hash(check_password(password))
        with self.sessions.begin() as s:
            user = self._get(s, username)
            user.password_hash = digest
            user.password_changed_at = self.clock()
            self._revoke_user(s, user.id)

    def _get(self, s: Session, username: str) -> UserAccount:
        user = s.scalar(select(UserAccount).where(UserAccount.username == username.strip().lower()))
        if user is None:
            raise AccountError(f"no user {username}")
        return user

    # --- sign-in ------------------------------------------------------------------------------
    def authenticate(self, username: str, password: str, client: str) -> SignedIn:
        """Check a password under throttling; :class:`SignInRefused` says why not (vaguely)."""
        name = username.strip().lower()[:64]
        keys = (f"user:{name}", f"addr:{client[:64]}")
        now = self.clock()
        if self._locked(keys, now):
            raise SignInRefused(
                "Too many failed sign-ins: try again in "
                f"{int(self.policy.lockout.total_seconds() // 60)} minutes.",
                locked=True,
            )
        user = self.user(name) if name else None
        ok = False
        try:
            ok = self.hasher.verify(user.password_hash if user else self._dummy_hash, password)
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok or user is None or not user.active:
            self._fail(keys, now)
            raise SignInRefused("Wrong user name or password, or the account is disabled.")
        with self.sessions.begin() as s:
            row = s.get(SignInThrottle, keys[0])
            if row is not None:
                s.delete(row)
            if self.hasher.check_needs_rehash(user.password_hash):
                fresh = s.get(UserAccount, user.id)
                if fresh is not None:
                    fresh.password_hash = self.hasher.hash(password)
        return SignedIn(user.id, user.username, user.display_name, Role(user.role))

    def _locked(self, keys: tuple[str, ...], now: datetime) -> bool:
        with self.sessions() as s:
            for key in keys:
                row = s.get(SignInThrottle, key)
                if row is not None and row.locked_until is not None and row.locked_until > now:
                    return True
        return False

    def _fail(self, keys: tuple[str, ...], now: datetime) -> None:
        limits = (self.policy.max_failures, self.policy.max_failures_per_address)
        with self.sessions.begin() as s:
            for key, limit in zip(keys, limits, strict=True):
                row = s.get(SignInThrottle, key)
                if row is None:
                    row = SignInThrottle(key=key, failures=0, first_failure_at=now)
                    s.add(row)
                elif now - row.first_failure_at > self.policy.lockout:
                    row.failures, row.first_failure_at, row.locked_until = 0, now, None
                row.failures += 1
                if row.failures >= limit:
                    row.locked_until = now + self.policy.lockout
            # forget stale counters, so spraying user names cannot grow the table without end
            s.execute(
                delete(SignInThrottle)
                .where(SignInThrottle.first_failure_at < now - 2 * self.policy.lockout)
                .where(
                    or_(SignInThrottle.locked_until.is_(None), SignInThrottle.locked_until < now)
                )
            )

    # --- sessions -----------------------------------------------------------------------------
    def open_session(self, user: SignedIn, client: str) -> str:
        """A new session for ``user``; returns the token for the cookie (stored hashed)."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self.sessions.begin() as s:
            s.execute(
                delete(ReviewSession).where(ReviewSession.expires_at < now - timedelta(days=1))
            )
            s.add(
                ReviewSession(
                    token_sha256=_digest(token),
                    user_id=user.user_id,
                    created_at=now,
                    last_seen_at=now,
                    expires_at=now + self.policy.absolute,
                    client=client[:64],
                )
            )
        return token

    def session_user(self, token: str) -> SignedIn | None:
        """The user of a live session, or None (unknown, revoked, idle, expired, disabled)."""
        if not token or len(token) > 128:
            return None
        now = self.clock()
        key = _digest(token)
        with self.sessions() as s:
            row = s.get(ReviewSession, key)
            if row is None or row.revoked_at is not None or row.expires_at <= now:
                return None
            if now - row.last_seen_at > self.policy.idle:
                return None
            user = s.get(UserAccount, row.user_id)
            if user is None or not user.active:
                return None
            signed = SignedIn(user.id, user.username, user.display_name, Role(user.role))
            stale = now - row.last_seen_at > _TOUCH_EVERY
        if stale:
            with self.sessions.begin() as s:
                s.execute(
                    update(ReviewSession)
                    .where(ReviewSession.token_sha256 == key)
                    .values(last_seen_at=now)
                )
        return signed

    def revoke(self, token: str) -> None:
        with self.sessions.begin() as s:
            s.execute(
                update(ReviewSession)
                .where(ReviewSession.token_sha256 == _digest(token))
                .where(ReviewSession.revoked_at.is_(None))
                .values(revoked_at=self.clock())
            )

    def revoke_user(self, username: str) -> None:
        """End every session of a user (sign-out everywhere)."""
        with self.sessions.begin() as s:
            self._revoke_user(s, self._get(s, username).id)

    def _revoke_user(self, s: Session, user_id: int) -> None:
        s.execute(
            update(ReviewSession)
            .where(ReviewSession.user_id == user_id)
            .where(ReviewSession.revoked_at.is_(None))
            .values(revoked_at=self.clock())
        )


# --- demo users (``her2low up`` with the demo on) --------------------------------------------


def demo_users_path(home: Path) -> Path:
    return home / "secrets" / "demo-users.json"


def ensure_demo_users(accounts: Accounts, home: Path) -> dict[str, dict[str, str]]:
    """One ``demo-<role>`` account per role, passwords kept in home/secrets (mode 0600).

    Idempotent: a re-run keeps the passwords of the file; an account that exists without a known
    password (or was disabled) gets a fresh random one and is enabled again.
    """
    path = demo_users_path(home)
    known: dict[str, dict[str, str]] = {}
    if path.is_file():
        try:
            known = json.loads(path.read_text())
        except ValueError:
            known = {}
    users: dict[str, dict[str, str]] = {}
    for role in Role:
        username = f"demo-{role.value}"
        password = (known.get(role.value) or {}).get("password", "")
        existing = accounts.user(username)
        if existing is None:
            password = password or new_password()
            accounts.add_user(username, role, password, f"Demo {role.display.lower()}")
        elif not password or not existing.active or not _matches(accounts, existing, password):
            password = new_password()
            accounts.reset_password(username, password)
            accounts.set_active(username, True)
        users[role.value] = {"username": username, "password": password}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(users, fh, indent=2)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return users


def _matches(accounts: Accounts, user: UserAccount, password: str) -> bool:
    try:
        return accounts.hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def read_demo_users(home: Path) -> dict[str, dict[str, str]]:
    """The demo accounts written by :func:`ensure_demo_users` ({} when there are none)."""
    path = demo_users_path(home)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def setup_demo_users(settings: Settings) -> dict[str, dict[str, str]]:
    """:func:`ensure_demo_users` on the configured (migrated) service database."""
    from her2low.core.database import make_engine, session_factory

    engine = make_engine(settings.cds_database_url)
    try:
        return ensure_demo_users(Accounts(session_factory(engine)), settings.home)
    finally:
        engine.dispose()
