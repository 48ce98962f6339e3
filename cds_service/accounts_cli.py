"""``her2low user add|list|disable|enable|reset-password``: review-app accounts from the shell.

Passwords come from an interactive prompt (typed twice) or, for scripts, the first line of
standard input (``--password-stdin``); never from the command line, where ``ps`` and shell history
would keep them, and never into a log. Only argparse is imported at module level, so building
the ``her2low`` parser stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from cds_service.accounts import Accounts

ROLES = ("radiologist", "oncologist", "pathologist", "board-coordinator", "admin")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``user`` sub-commands, on the parser ``her2low`` made for ``user``."""
    sub = parser.add_subparsers(dest="user_command", required=True, metavar="SUBCOMMAND")
    stdin_help = "read the password from the first line of stdin instead of prompting"
    p = sub.add_parser(
        "add",
        help="create an account (password prompted or from stdin)",
        description="Create a review-app account with one role. The password (12 characters "
        "or more) is prompted twice, or read from stdin with --password-stdin; it is stored "
        "only as an argon2id hash.",
    )
    p.add_argument("username", help="lower-case letters, digits, '.', '_', '@', '-'")
    p.add_argument("--role", required=True, choices=ROLES, help="what the user may do")
    p.add_argument("--name", default="", help="display name shown in the app")
    p.add_argument("--password-stdin", action="store_true", help=stdin_help)
    p = sub.add_parser(
        "list",
        help="accounts with role and state",
        description="List every review-app account with its role and whether it is active "
        "(passwords are never shown: only their hashes are stored).",
    )
    p.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    p = sub.add_parser(
        "disable",
        help="disable an account and end its sessions now",
        description="Disable a review-app account: it can no longer sign in and every open "
        "session of it ends at once. Accounts are never deleted (the audit trail names them).",
    )
    p.add_argument("username", help="the account to disable")
    p = sub.add_parser(
        "enable",
        help="enable a disabled account again",
        description="Enable a disabled review-app account again; it signs in with its existing "
        "password (reset it first if that may be known to someone else).",
    )
    p.add_argument("username", help="the account to enable")
    p = sub.add_parser(
        "reset-password",
        help="set a new password and end the user's sessions",
        description="Set a new password for a review-app account (prompted twice, or from stdin "
        "with --password-stdin); every open session of the account ends at once.",
    )
    p.add_argument("username", help="the account whose password changes")
    p.add_argument("--password-stdin", action="store_true", help=stdin_help)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    first = getpass.getpass("New password: ")
    if getpass.getpass("Repeat it: ") != first:
        raise ValueError("the two passwords differ")
    return first


def _accounts() -> tuple[Accounts, Engine]:
    from cds_service.accounts import Accounts
    from cds_service.db import MIGRATIONS
    from her2low.core.database import make_engine, session_factory
    from her2low.core.settings import load_settings

    settings = load_settings()
    url = settings.cds_database_url
    MIGRATIONS.check_current(url)  # NotMigratedError → `her2low db upgrade` (exit 3)
    engine = make_engine(url)
    return Accounts(session_factory(engine)), engine


def run(args: argparse.Namespace) -> int:
    """Run one ``user`` sub-command; 0 on success, 1 with a message on a refused change."""
    from cds_service.accounts import AccountError
    from her2low.core.commands import fail

    accounts, engine = _accounts()
    try:
        command = args.user_command
        if command == "list":
            rows = [
                {
                    "username": u.username,
                    "name": u.display_name,
                    "role": u.role,
                    "active": u.active,
                    "created_at": u.created_at.isoformat(),
                }
                for u in accounts.users()
            ]
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for r in rows:
                    state = "active" if r["active"] else "disabled"
                    print(f"{r['username']:<24} {r['role']:<18} {state:<9} {r['name']}")
            return 0
        if command == "add":
            accounts.add_user(args.username, args.role, _password(args.password_stdin), args.name)
            print(f"user {args.username.strip().lower()} added ({args.role})")
        elif command == "disable":
            accounts.set_active(args.username, False)
            print(f"user {args.username} disabled; its sessions have ended")
        elif command == "enable":
            accounts.set_active(args.username, True)
            print(f"user {args.username} enabled")
        elif command == "reset-password":
            accounts.reset_password(args.username, _password(args.password_stdin))
            print(f"password of {args.username} changed; its sessions have ended")
        return 0
    except (AccountError, ValueError) as exc:
        return fail("her2low user", exc)
    finally:
        engine.dispose()


HELP = "review-app accounts: add, list, disable, enable, reset-password"
DESCRIPTION = (
    "Manage the local accounts of the tumour-board review app. Each account has one role "
    "(radiologist, oncologist, pathologist, board-coordinator, admin) that decides what it may "
    "do; passwords are prompted (or read from stdin), never given on the command line."
)
COMMANDS = {"user": (HELP, DESCRIPTION, add_arguments, run)}
