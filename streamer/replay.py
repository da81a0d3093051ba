"""`ctstream replay`: re-publish archived records, or the live table as
SNAPSHOT records (issue 5)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    rp = sub.add_parser("replay", help="re-publish archived records, or the live table (--snapshot)")
    rp.set_defaults(func=main)


def main(a: argparse.Namespace) -> int:
    raise NotImplementedError("ctstream replay")
