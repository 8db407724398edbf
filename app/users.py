"""Manage logins and roles.

    python -m app.users add NAME --role admin      # asks for a password (or --password)
    python -m app.users set-role NAME annotator
    python -m app.users api-key NAME               # prints a new API key once; only its hash is kept
    python -m app.users list

Roles: user (chat, vote), annotator (+ ranking screen), admin (+ retrain, promote, roll back,
moderation review, data import/export, user management). Once any user has a password,
the app asks everyone to log in.
"""

from __future__ import annotations

import argparse
import getpass
import re
import secrets
import sys

from app.auth import LOCAL_USER, hash_secret
from app.settings import load_settings
from feedback import repository
from feedback.db import make_engine, make_session_factory, migrate, session_scope
from feedback.models import ROLES

NAME = re.compile(r"^[A-Za-z0-9_.@-]{2,80}$")


def add_user(session_factory, name: str, role: str, password: str) -> None:
    if not NAME.match(name) or name == LOCAL_USER:
        raise repository.ValidationError(f"'{name}' is not a valid user name (2-80 letters, digits, _.@-; not 'local').")
    if len(password) < 8:
        raise repository.ValidationError("Passwords need at least 8 characters.")
    with session_scope(session_factory) as s:
        if repository.get_user(session=s, name=name) is not None:
            raise repository.ValidationError(f"User {name} exists already; use set-role or password.")
        user = repository.get_or_create_user(session=s, name=name, role=role)
        user.password_hash = hash_secret(password)


def new_api_key(session_factory, name: str) -> str:
    with session_scope(session_factory) as s:
        user = repository.get_user(session=s, name=name)
        if user is None:
            raise repository.NotFoundError(f"No user named {name}.")
        # The user id in the key finds the one hash to check; the secret part is never stored.
        key = f"sk-fc-{user.id}." + secrets.token_urlsafe(24)
        user.api_key_hash = hash_secret(key)
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="create a login")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="user")
    add.add_argument("--password", default=None, help="omit to be asked (keeps it out of shell history)")
    role = sub.add_parser("set-role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    pw = sub.add_parser("password", help="set a new password")
    pw.add_argument("name")
    pw.add_argument("--password", default=None)
    key = sub.add_parser("api-key", help="issue a new API key (replaces the old one)")
    key.add_argument("name")
    sub.add_parser("list", help="list users and roles")
    args = parser.parse_args()

    settings = load_settings()
    migrate(settings.db_url)
    factory = make_session_factory(make_engine(settings.db_url))
    try:
        if args.cmd == "add":
            add_user(factory, args.name, args.role, args.password or getpass.getpass(f"Password for {args.name}: "))
            print(f"Added {args.name} ({args.role}). The app now asks for a login.")
        elif args.cmd == "set-role":
            with session_scope(factory) as s:
                repository.set_role(session=s, name=args.name, role=args.role)
            print(f"{args.name} is now {args.role}.")
        elif args.cmd == "password":
            password = args.password or getpass.getpass(f"New password for {args.name}: ")
            if len(password) < 8:
                raise repository.ValidationError("Passwords need at least 8 characters.")
            with session_scope(factory) as s:
                user = repository.get_user(session=s, name=args.name)
                if user is None:
                    raise repository.NotFoundError(f"No user named {args.name}.")
                user.password_hash = hash_secret(password)
            print("Password changed.")
        elif args.cmd == "api-key":
            print(new_api_key(factory, args.name))
        else:
            with session_scope(factory) as s:
                for u in repository.list_users(session=s):
                    print(f"{u.name:<24} {u.role:<10} {'login' if u.password_hash else 'no login'}"
                          f"{'  api key' if u.api_key_hash else ''}{'  opted out' if u.opted_out else ''}")
    except (repository.ValidationError, repository.NotFoundError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
