"""`ctstream account` and `ctstream top`: argument parsing and entry points."""

from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    ac = sub.add_parser("account", help="consume the stream into a flow-accounting database")
    ac.set_defaults(func=account_main)
    tp = sub.add_parser("top", help="top talkers from the accounting database")
    tp.set_defaults(func=top_main)


def account_main(a: argparse.Namespace) -> int:
    raise NotImplementedError("ctstream account")


def top_main(a: argparse.Namespace) -> int:
    raise NotImplementedError("ctstream top")
