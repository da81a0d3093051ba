"""`ctstream config check|apply|show`.

check validates a file as `run` would read it and says every problem as
FILE:LINE: reason (exit 2). apply checks the file, then asks the daemon of
--pin-dir to apply it (control socket) and prints the generation now in
force; a bad file, a setting that needs a restart, or no daemon: nothing
changes, and it says why. show reads back from the pinned maps what the
kernel uses now, whoever wrote it.
"""

from __future__ import annotations

import json
import sys

from ..datapath import abi
from ..datapath.config import EVENT_MASK_NAMES
from ..datapath.loader import load_attachments
from ..datapath.table import PinnedTable
from ..errors import StreamerError
from . import server
from .check import check_file

_QUIET = {"new": abi.CFG_QUIET_CREATE, "assured": abi.CFG_QUIET_ASSURED,
          "state": abi.CFG_QUIET_STATE}
_TIMEOUTS = {"syn": abi.TO_SYN, "established": abi.TO_EST, "fin": abi.TO_FIN,
             "udp": abi.TO_UDP, "icmp": abi.TO_ICMP, "other": abi.TO_OTHER}


def config_main(a) -> int:
    if a.config_cmd == "check":
        return _check(a.file)
    if a.config_cmd == "apply":
        return _apply(a.file, a.pin_dir)
    return _show(a.pin_dir, a.output)


def _check(path: str) -> int:
    problems = check_file(path)
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"ctstream: {path}: {len(problems)} problem{'s' * (len(problems) != 1)}",
              file=sys.stderr)
        return 2
    print(f"ctstream: {path}: ok")
    return 0


def _apply(path: str, pin_dir: str) -> int:
    import os

    problems = check_file(path)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"ctstream: {path}: nothing was applied", file=sys.stderr)
        return 2
    reply = server.request(pin_dir, {"op": "apply", "path": os.path.abspath(path)})
    if not reply.get("ok"):
        print(f"ctstream: error: {reply.get('error')}; nothing was changed", file=sys.stderr)
        return 2 if reply.get("kind", "config") == "config" else 1
    for c in reply.get("changed") or []:
        print(f"  {c}")
    print(f"generation {reply['generation']} in force")
    return 0


def read_in_force(pin_dir: str) -> dict:
    """What the kernel uses now, from the pinned maps."""
    from ..datapath.generation import Generations

    with PinnedTable(pin_dir) as t:
        gens = Generations({n: t.fd(n) for n in ("ct_meta", "ct_config", "ct_sel4", "ct_sel6")})
        f = gens.in_force()
    c = f.config
    names = _interface_names(pin_dir)
    sets = {}
    for idx, table in sorted(f.selection.items()):
        default = table.get("0.0.0.0/0", "track")
        one = {"default": default,
               "track-prefixes": [p for p, v in table.items() if v == "track" and not p.endswith("/0")],
               "ignore-prefixes": [p for p, v in table.items() if v == "ignore" and not p.endswith("/0")]}
        if idx:
            one["interface"] = names.get(idx)
        sets[str(idx)] = one
    return {
        "generation": f.generation, "slot": f.slot, "layout": f.layout,
        "timeouts": {n: c["timeout_ns"][i] / 1e9 for n, i in _TIMEOUTS.items()},
        "report_interval": c["report_interval_ns"] / 1e9,
        "event_mask": [n for n in EVENT_MASK_NAMES if not c["flags"] & _QUIET.get(n, 0)],
        "grace": c["grace_ns"] / 1e9,
        "drop_untracked": bool(c["flags"] & abi.CFG_DROP_UNTRACKED),
        "syn_cookies": {"mode": "on" if c["flags"] & abi.CFG_SYNCOOKIE else
                        "auto" if c["flags"] & abi.CFG_SYNCOOKIE_AUTO else "off",
                        "rate": c["syn_rate"], "high": c["syn_high_pct"] / 100,
                        "wscale": c["syn_wscale"]},
        "table_limit": c["table_limit"], "ipv6_limit": c["ipv6_limit"],
        "early_drop_low_entries": c["early_low"],
        "selection": {"active": bool(c["flags"] & abi.CFG_SELECT),
                      "per_interface": bool(c["flags"] & abi.CFG_SELECT_IFACE), "sets": sets},
    }


def _interface_names(pin_dir: str) -> dict[int, str]:
    """ifindex -> name of the interfaces the pin dir's programs are attached to."""
    from ..datapath.loader import ifindex

    out = {}
    for att in load_attachments(pin_dir):
        try:
            out[ifindex(att.ifname, att.netns)] = att.ifname
        except StreamerError:
            continue
    return out


def _show(pin_dir: str, output: str) -> int:
    d = read_in_force(pin_dir)
    if output == "json":
        print(json.dumps(d))
        return 0
    print(f"generation {d['generation']} (slot {d['slot']}, layout {d['layout']})")
    t = d["timeouts"]
    print("timeouts        " + " ".join(f"{n} {v:g}s" for n, v in t.items()))
    print(f"report-interval {d['report_interval']:g}s")
    print(f"event-mask      {','.join(d['event_mask'])}")
    print(f"grace           {d['grace']:g}s")
    print(f"drop-untracked  {'yes' if d['drop_untracked'] else 'no'}")
    sc = d["syn_cookies"]
    print(f"syn-cookies     {sc['mode']}" + (f" (auto: {sc['rate']} SYNs/s a port, table "
                                             f"{sc['high']:.0%})" if sc["mode"] == "auto" else ""))
    print(f"table           {d['table_limit']} entries, ipv6 {d['ipv6_limit']}, early drop "
          f"stops at {d['early_drop_low_entries']}")
    sel = d["selection"]
    if not sel["active"]:
        print("selection       none: every flow is tracked")
    for idx, one in sel["sets"].items():
        where = "top level" if idx == "0" else f"interface {one.get('interface') or '?'} (ifindex {idx})"
        print(f"selection       {where}: default {one['default']}")
        for kind in ("track-prefixes", "ignore-prefixes"):
            if one[kind]:
                print(f"  {kind:15} {' '.join(one[kind])}")
    return 0

