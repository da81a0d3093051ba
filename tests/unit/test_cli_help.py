"""The command line's conventions, over the whole argparse tree of
streamer.cli.build_parser: every subcommand has a one-line help and a
description, every option and argument a help text, and a short option means
the same long option in every subcommand (-n is a network namespace, as in
`ip -n`, wherever it exists)."""

from __future__ import annotations

import argparse

from streamer.cli import build_parser


def parsers(p: argparse.ArgumentParser, path: str = "ctstream", short_help: str | None = None):
    """(path, parser, its line in the parent's list) of p and every subcommand below it."""
    yield path, p, short_help
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield from parsers(sub, f"{path} {name}", helps.get(name))


def missing_help(root: argparse.ArgumentParser) -> list[str]:
    out = []
    for path, p, short_help in parsers(root):
        if path != "ctstream" and not (short_help or "").strip():
            out.append(f"{path}: no help line in the list of subcommands")
        if not (p.description or "").strip():
            out.append(f"{path}: no description")
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            if not (a.help or "").strip() or a.help == argparse.SUPPRESS:
                out.append(f"{path}: {'/'.join(a.option_strings) or a.dest} has no help")
    return out


def short_meanings(root: argparse.ArgumentParser) -> dict[str, dict[str, list[str]]]:
    """short option -> its long option(s) -> the parsers that say so."""
    out: dict[str, dict[str, list[str]]] = {}
    for path, p, _ in parsers(root):
        for a in p._actions:
            shorts = [o for o in a.option_strings if not o.startswith("--")]
            longs = "/".join(sorted(o for o in a.option_strings if o.startswith("--"))) or "(none)"
            for s in shorts:
                out.setdefault(s, {}).setdefault(longs, []).append(path)
    return out


def test_every_subcommand_and_option_has_help():
    problems = missing_help(build_parser())
    assert not problems, "\n".join(problems)


def test_the_walk_sees_every_subcommand():
    paths = {path for path, _, _ in parsers(build_parser())}
    assert {"ctstream run", "ctstream events", "ctstream status", "ctstream list",
            "ctstream stats", "ctstream detach", "ctstream top", "ctstream account"} <= paths


def test_a_short_option_means_one_long_option_everywhere():
    meanings = short_meanings(build_parser())
    clashes = {s: m for s, m in meanings.items() if len(m) != 1 or "(none)" in m}
    assert not clashes, clashes
    assert list(meanings["-n"]) == ["--netns"]
    assert list(meanings["-o"]) == ["--output"]
    assert list(meanings["-i"]) == ["--interface"]


def test_top_takes_its_row_count_as_limit():
    a = build_parser().parse_args(["top", "--limit", "3"])
    assert a.limit == 3
    top = dict((path, p) for path, p, _ in parsers(build_parser()))["ctstream top"]
    assert not any("-n" in act.option_strings for act in top._actions)


def test_the_checks_find_what_they_look_for():
    # The same walk over a parser with the faults it must report.
    p = argparse.ArgumentParser(prog="ctstream", description="x")
    sub = p.add_subparsers(dest="cmd")
    a = sub.add_parser("quiet")                         # no help, no description
    a.add_argument("--pin-dir")                         # no help
    a.add_argument("-n", "--rows", help="rows")
    b = sub.add_parser("fine", help="ok", description="ok")
    b.add_argument("-n", "--netns", help="namespace")
    problems = missing_help(p)
    assert "ctstream quiet: no help line in the list of subcommands" in problems
    assert "ctstream quiet: no description" in problems
    assert "ctstream quiet: --pin-dir has no help" in problems
    assert not [x for x in problems if x.startswith("ctstream fine")]
    assert set(short_meanings(p)["-n"]) == {"--rows", "--netns"}
