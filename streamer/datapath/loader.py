"""Compile the datapath with BCC, pin its maps, configure it, attach it.

Sizes known at load time become -D flags built from validated integers
(DatapathConfig.validate); timeouts and limits go into the ct_config map.
Attachments are recorded in /run/ctstream so that `ctstream detach` can undo
what a process that died left attached.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import abi
from . import bpfsys
from . import netns
from .config import DatapathConfig
from .generation import Generations
from ..errors import EnvironmentProblem, InterfaceError, LoadError

MAIN_SOURCE = "ctstream.bpf.c"


def _bpf_dir() -> Path:
    """$CTSTREAM_BPF_DIR; else the package data of an installed copy
    (streamer/bpf, which pyproject.toml maps from the top-level bpf/); else
    the bpf/ of this checkout (also pip install -e)."""
    env = os.environ.get("CTSTREAM_BPF_DIR")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    installed = package / "bpf"
    return installed if (installed / MAIN_SOURCE).is_file() else package.parent / "bpf"


BPF_DIR = _bpf_dir()
STATE_DIR = Path("/run/ctstream")

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
TC_EGRESS_PARENT = "ffff:fff3"
TC_INGRESS_PARENT = "ffff:fff2"
# The tc attachments: kind -> (program, clsact parent).
TC_HOOKS = {"tc-ingress": ("ct_tc_ingress", TC_INGRESS_PARENT),
            "tc-egress": ("ct_tc_egress", TC_EGRESS_PARENT)}
TC_PRIO = 49152  # tc's default first priority; our filter is found by name

GENERATION_MAPS = ("ct_meta", "ct_config", "ct_sel4", "ct_sel6")
PROGRAMS = ("ct_xdp_ingress", "ct_tc_ingress", "ct_tc_egress", "ct_sweep4", "ct_sweep6",
            "ct_early4", "ct_early6", "ct_ack4", "ct_ack6", "ct_merge4", "ct_merge6")

_INCLUDE = re.compile(r'\s*#\s*include\s+"([A-Za-z0-9_.]+)"\s*$')


def expand_source(name: str = MAIN_SOURCE, bpf_dir: Path = BPF_DIR) -> str:
    """One text from our own quoted includes (see bpf/ctstream.bpf.c for why),
    with #line markers so compiler messages name the real file and line."""
    seen: set[str] = set()

    def expand(fname: str) -> list[str]:
        path = bpf_dir / fname
        out = [f'#line 1 "{path}"']
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            m = _INCLUDE.match(line)
            if not m:
                out.append(line)
                continue
            if m.group(1) not in seen:
                seen.add(m.group(1))
                out.extend(expand(m.group(1)))
            out.append(f'#line {lineno + 1} "{path}"')
        return out

    return "\n".join(expand(name)) + "\n"


LAYOUT_ENV = "CTSTREAM_LAYOUT"


def build_layout() -> int:
    """The layout of the pinned maps this process builds: this source's
    (abi.LAYOUT_VERSION), or with CTSTREAM_LAYOUT=3 the next one, which
    exists to exercise `ctstream migrate` (bpf/ct_abi.h)."""
    text = os.environ.get(LAYOUT_ENV, "")
    if not text:
        return abi.LAYOUT_VERSION
    if not text.isdigit() or int(text) not in abi.TABLE_LAYOUTS:
        raise LoadError(f"{LAYOUT_ENV}={text!r}: the layouts this build makes are "
                        f"{', '.join(map(str, abi.TABLE_LAYOUTS))}")
    return int(text)


def cflags(cfg: DatapathConfig, bpf_dir: Path = BPF_DIR, layout: int | None = None) -> list[str]:
    return [
        f"-I{bpf_dir}",
        f"-DCT_LAYOUT={int(layout or build_layout())}",
        f'-DCT_PIN_DIR="{cfg.pin_dir}"',  # validated: /sys/fs/bpf/[A-Za-z0-9_.-/]+
        f"-DCT_MAX4={int(cfg.table_limit)}",
        f"-DCT_MAX6={int(cfg.ipv6_capacity())}",
        f"-DCT_RING_BYTES={int(cfg.ring_bytes)}",
        "-Wno-unused-function",
    ]


def check_environment() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "ctstream needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON): run it with sudo")
    if not os.path.exists("/proc/sys/kernel/unprivileged_bpf_disabled"):
        raise EnvironmentProblem("this kernel has no BPF support (CONFIG_BPF_SYSCALL)")
    if not os.path.ismount("/sys/fs/bpf"):
        try:
            os.makedirs("/sys/fs/bpf", exist_ok=True)
            _mount_bpffs()
        except OSError as exc:
            raise EnvironmentProblem(
                "bpffs is not mounted at /sys/fs/bpf and mounting it failed "
                f"({exc.strerror}): mount -t bpf bpf /sys/fs/bpf") from exc
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not build.exists():
        raise EnvironmentProblem(
            f"no kernel headers for BCC at {build}: run scripts/setup.sh, which wires "
            "Debian's linux-headers for this kernel")


def _mount_bpffs() -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"bpf", b"/sys/fs/bpf", b"bpf", 0, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def ifindex(ifname: str, ns: str | None = None) -> int:
    if not re.fullmatch(r"[A-Za-z0-9_.@:-]{1,15}", ifname or ""):
        raise InterfaceError(f"bad interface name {ifname!r}")
    with netns.entered(ns):
        try:
            return socket.if_nametoindex(ifname)
        except OSError as exc:
            where = f" in network namespace {ns}" if ns else ""
            raise InterfaceError(f"no such interface: {ifname}{where}") from exc


@dataclass
class Attachment:
    ifname: str
    kind: str            # "xdp" | "tc-ingress" | "tc-egress"
    netns: str | None
    mode: str = ""       # xdp: "native" | "generic"
    own_clsact: bool = False
    prog_id: int = 0     # xdp: the program attached (an upgrade replaces exactly it)


class Datapath:
    """The compiled, pinned and configured programs and maps of one pin dir."""

    def __init__(self, cfg: DatapathConfig):
        self.cfg = cfg.validate()
        self.bpf = None
        self.attachments: list[Attachment] = []
        self.adopted = False
        self.generations: Generations | None = None
        self.replaced = 0                # programs of a previous owner replaced in one step
        self.layout = abi.LAYOUT_VERSION   # set by load(): the layout this build makes
        self.table_layout = abi.TABLE_LAYOUTS[self.layout]
        self.generation = 0              # the configuration generation in force
        # Interfaces that per-interface selection sets may name: name -> ifindex.
        self.ifindexes: dict[str, int] = {}

    # ---- load -------------------------------------------------------------
    def load(self, configure: bool = True, layout: int | None = None) -> "Datapath":
        """Compile and load; pins already there are adopted (their layout must
        be this build's). configure=False (migrate) leaves ct_meta and the
        configuration as they are, and the pinned layout unchecked."""
        check_environment()
        from bcc import BPF  # Debian's python3-bpfcc

        self.layout = layout or build_layout()
        self.table_layout = abi.TABLE_LAYOUTS[self.layout]
        self.adopted = pinned_layout(self.cfg.pin_dir) is not None
        if self.adopted and configure:
            check_layout(self.cfg.pin_dir, self.layout)
        # Root only, also when it was made before by other means (the one
        # place that sets it: systemd/ctstream.service has no ExecStartPre).
        os.makedirs(self.cfg.pin_dir, mode=0o700, exist_ok=True)
        os.chmod(self.cfg.pin_dir, 0o700)
        try:
            self.bpf = BPF(text=expand_source(), cflags=cflags(self.cfg, layout=self.layout))
            self.progs = {name: self.bpf.load_func(
                name, BPF.XDP if name == "ct_xdp_ingress" else BPF.SCHED_CLS)
                for name in PROGRAMS}
        except Exception as exc:  # BCC raises bare Exception
            hint = ""
            if self.adopted:
                hint = (f"; maps pinned at {self.cfg.pin_dir} may come from a different "
                        "configuration: `ctstream detach` removes them")
            raise LoadError(f"loading the BPF datapath failed: {exc}{hint}") from exc
        if configure:
            self.configure()
            self._seed_global()
        return self

    def fd(self, map_name: str) -> int:
        return self.bpf[map_name].map_fd

    def prog_fd(self, name: str) -> int:
        return self.progs[name].fd

    def progs_fds(self) -> dict[str, int]:
        return {name: fn.fd for name, fn in self.progs.items()}

    def previous_attachments(self) -> list[Attachment]:
        """What the previous owner of these pins left attached (a daemon that
        died, or one stopped with --keep)."""
        return load_attachments(self.cfg.pin_dir)

    def configure(self) -> int:
        """Make self.cfg's run-time part (ct_config and the selection) the
        configuration in force, as a new generation; safe while attached.
        Returns the generation."""
        if self.generations is None:
            self.generations = Generations({n: self.fd(n) for n in GENERATION_MAPS}, self.layout)
        self.generation = self.generations.apply(self.cfg, self.ifindexes)
        return self.generation

    def global_state(self) -> dict:
        raw = bpfsys.map_lookup(self.fd("ct_global"), b"\0" * 4, abi.GLOBAL.size)
        return abi.unpack_global(raw)

    def _seed_global(self) -> None:
        """Seed a new table's global state before anything is attached.

        ct_id starts at wall-clock nanoseconds, so ids stay unique across
        reboots and tables made anew (below 1e9 connections a second). The
        sweeper cursors start two slots back from now (bpf_ktime_get_ns is
        CLOCK_MONOTONIC): every entry will be filed under a later slot, so
        none can be left behind the cursor. An adopted table keeps both.

        The element is written back whole, so it is written only when
        something needs seeding: an adopted table runs under the previous
        owner's programs, still attached, and a write-back would undo their
        atomic updates of entries and next_ct_id in between (a wrong table
        fill, ct_ids handed out twice)."""
        raw = bytearray(bpfsys.map_lookup(self.fd("ct_global"), b"\0" * 4, abi.GLOBAL.size))
        g = abi.unpack_global(bytes(raw))
        seeded = False
        if g["next_ct_id"] == 0:
            raw[0:8] = time.time_ns().to_bytes(8, "little")
            seeded = True
        start = (time.monotonic_ns() >> abi.SLOT_SHIFT) - 2
        offsets = abi.GLOBAL.offsets()
        for i, name in enumerate(("cursor4", "cursor6")):
            if g[name] == 0:
                off = offsets["cursor"] + 4 * i
                raw[off:off + 4] = start.to_bytes(4, "little")
                seeded = True
        if seeded:
            bpfsys.map_update(self.fd("ct_global"), b"\0" * 4, bytes(raw))

    # ---- attach -----------------------------------------------------------
    def attach_xdp(self, ifname: str, ns: str | None = None, mode: str | None = None) -> Attachment:
        """Attach ct_xdp_ingress. Where the previous owner of these pins left
        its program attached (an upgrade, a restart), ours replaces exactly
        that one in one step (XDP_FLAGS_REPLACE against its fd): every
        packet meets the old program or the new one, both on the same maps,
        and a program someone else attached in between is not overwritten."""
        mode = mode or self.cfg.xdp_mode
        idx = ifindex(ifname, ns)
        previous = None
        recorded = load_attachments(self.cfg.pin_dir)
        for old in recorded:
            if (old.ifname, old.kind, old.netns) == (ifname, "xdp", ns) and old.mode:
                previous = old
        # The XDP programs this pin dir's daemons attached (also under another
        # namespace spelling: started inside the namespace, or with -n).
        ours = {a.prog_id for a in recorded if a.kind == "xdp" and a.prog_id}
        if mode == "auto" and previous is not None:
            # Native and generic XDP exclude each other: keep the mode.
            mode = previous.mode
        tries = {"native": [("native", XDP_FLAGS_DRV_MODE)],
                 "generic": [("generic", XDP_FLAGS_SKB_MODE)],
                 "auto": [("native", XDP_FLAGS_DRV_MODE), ("generic", XDP_FLAGS_SKB_MODE)]}[mode]
        fd = self.prog_fd("ct_xdp_ingress")
        last = None
        with netns.entered(ns):
            for name, flags in tries:
                try:
                    replaced = self._replace_xdp(ifname, idx, fd, flags, previous if previous
                                                 and previous.mode == name else None, ours)
                except InterfaceError:
                    raise
                except OSError as exc:
                    last = exc
                    continue
                att = Attachment(ifname, "xdp", ns, mode=name,
                                 prog_id=bpfsys.prog_id_tag(fd)[0])
                self._record(att)
                self.replaced += replaced
                return att
        raise InterfaceError(f"cannot attach XDP ({mode}) to {ifname}: {last}")

    @staticmethod
    def _replace_xdp(ifname: str, idx: int, fd: int, flags: int,
                     previous: Attachment | None, ours: set[int]) -> int:
        """Attach fd; returns 1 if it replaced the previous owner's program.
        A record without a program id (an older build's) vouches for the
        program on its own interface."""
        current = bpfsys.xdp_prog_id(idx, flags)
        if not current:
            bpfsys.xdp_attach(idx, fd, flags)
            return 0
        legacy = previous is not None and not previous.prog_id
        if current not in ours and not legacy:
            raise InterfaceError(
                f"another XDP program (id {current}) is attached to {ifname}, not one this pin "
                "dir's ctstream attached: ctstream does not replace it (detach it first)")
        old_fd = bpfsys.prog_fd_by_id(current)
        try:
            bpfsys.xdp_attach(idx, fd, flags, old_prog_fd=old_fd)
        finally:
            os.close(old_fd)
        return 1

    def attach_tc_egress(self, ifname: str, ns: str | None = None) -> Attachment:
        return self.attach_tc(ifname, "tc-egress", ns)

    def attach_tc_ingress(self, ifname: str, ns: str | None = None) -> Attachment:
        return self.attach_tc(ifname, "tc-ingress", ns)

    def attach_tc(self, ifname: str, kind: str, ns: str | None = None) -> Attachment:
        """Our program on the clsact qdisc's ingress or egress side. The
        qdisc is ours (removed on detach) only if we added it; ingress and
        egress on one interface share it."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        prog, parent = TC_HOOKS[kind]
        idx = ifindex(ifname, ns)
        own = False
        with netns.entered(ns), IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", idx)
                own = True
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise InterfaceError(f"cannot add clsact qdisc on {ifname}: {exc}") from exc
            for old in load_attachments(self.cfg.pin_dir):
                if (old.ifname, old.kind, old.netns) == (ifname, kind, ns):
                    own = own or old.own_clsact  # adopted: the clsact is still ours
            try:
                # replace: an adopted filter is swapped for ours in one step
                ipr.tc("replace-filter", "bpf", idx, ":1", fd=self.prog_fd(prog),
                       name=prog, parent=parent, classid=1, direct_action=True, prio=TC_PRIO)
            except NetlinkError as exc:
                if own:
                    ipr.tc("del", "clsact", idx)
                raise InterfaceError(f"cannot attach the {kind} program to {ifname}: "
                                     f"{exc}") from exc
        att = Attachment(ifname, kind, ns, own_clsact=own)
        self._record(att)
        return att

    def _record(self, att: Attachment) -> None:
        self.attachments.append(att)
        same = (att.ifname, att.kind, att.netns)
        kept = [a for a in load_attachments(self.cfg.pin_dir) if (a.ifname, a.kind, a.netns) != same]
        save_attachments(self.cfg.pin_dir, kept + [att])

    def detach_all(self) -> list[str]:
        problems = detach(self.attachments)
        self.attachments = []
        save_attachments(self.cfg.pin_dir, [])
        return problems

    def detach_list(self, atts: list[Attachment]) -> list[str]:
        """Detach some recorded attachments (not ours) and forget them."""
        if not atts:
            return []
        problems = detach(atts)
        gone = {(a.ifname, a.kind, a.netns) for a in atts}
        save_attachments(self.cfg.pin_dir, [a for a in load_attachments(self.cfg.pin_dir)
                                            if (a.ifname, a.kind, a.netns) not in gone])
        return problems

    def close(self) -> None:
        if self.generations is not None:
            self.generations.close()
            self.generations = None
        if self.bpf is not None:
            self.bpf.cleanup()
            self.bpf = None


# ---- attachment records and teardown (also for a process that died) -------

def pinned_meta(pin_dir: str) -> dict | None:
    """ct_meta of the maps pinned at pin_dir (None: no ct_meta pinned)."""
    try:
        fd = bpfsys.obj_get(os.path.join(pin_dir, "ct_meta"))
    except FileNotFoundError:
        return None
    try:
        raw = bpfsys.map_lookup(fd, b"\0" * 4, abi.META.size)
    finally:
        os.close(fd)
    return abi.unpack_meta(raw) if raw else None


def pinned_layout(pin_dir: str) -> int | None:
    """The layout of the maps pinned at pin_dir: None if there are none, 1
    for maps made before layouts were recorded (no ct_meta), else the
    layout ct_meta records (0: made, never configured: judged by the names
    of its tables)."""
    tables = [n for n, t in abi.TABLE_LAYOUTS.items()
              if os.path.exists(os.path.join(pin_dir, t.pin4))]
    if not tables:
        return None
    meta = pinned_meta(pin_dir)
    if meta is None:
        return 1
    return meta["layout"] or tables[0]


def check_layout(pin_dir: str, layout: int | None = None) -> None:
    """Refuse maps this build would misread."""
    layout = layout or build_layout()
    pinned = pinned_layout(pin_dir)
    if pinned is not None and pinned != layout:
        raise LoadError(
            f"the maps pinned at {pin_dir} have layout {pinned}, and this build of ctstream "
            f"reads layout {layout} only: `ctstream migrate --pin-dir {pin_dir}` "
            "moves their entries and outbox into this build's layout (or `ctstream detach "
            f"--pin-dir {pin_dir}` removes them, giving both up)")
    meta = pinned_meta(pin_dir)
    if meta and meta["frozen"]:
        raise LoadError(f"the maps pinned at {pin_dir} are frozen by a migration that did not "
                        f"finish: run `ctstream migrate --pin-dir {pin_dir}` again")


def _state_file(pin_dir: str) -> Path:
    return STATE_DIR / (pin_dir.strip("/").replace("/", "_") + ".json")


def load_attachments(pin_dir: str) -> list[Attachment]:
    try:
        data = json.loads(_state_file(pin_dir).read_text())
    except (OSError, ValueError):
        return []
    return [Attachment(**a) for a in data.get("attachments", [])]


def save_attachments(pin_dir: str, atts: list[Attachment]) -> None:
    path = _state_file(pin_dir)
    if not atts:
        path.unlink(missing_ok=True)
        return
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"attachments": [asdict(a) for a in atts]}))
    os.replace(tmp, path)


def detach(atts: list[Attachment]) -> list[str]:
    """Undo attachments; returns what could not be undone (interfaces that
    are gone take their programs with them and are not a problem)."""
    problems = []
    for att in reversed(atts):
        try:
            if att.kind == "xdp":
                _detach_xdp(att)
            else:
                _detach_tc(att)
        except InterfaceError:
            continue  # interface or namespace gone: nothing left attached
        except Exception as exc:
            problems.append(f"{att.kind} on {att.ifname}: {exc}")
    return problems


def _detach_xdp(att: Attachment) -> None:
    from bcc import BPF
    ifindex(att.ifname, att.netns)
    flags = XDP_FLAGS_DRV_MODE if att.mode == "native" else XDP_FLAGS_SKB_MODE
    with netns.entered(att.netns):
        BPF.remove_xdp(att.ifname, flags)


def _detach_tc(att: Attachment) -> None:
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    idx = ifindex(att.ifname, att.netns)
    _, parent = TC_HOOKS.get(att.kind, TC_HOOKS["tc-egress"])
    with netns.entered(att.netns), IPRoute() as ipr:
        try:
            if att.own_clsact:
                ipr.tc("del", "clsact", idx)
            else:
                ipr.tc("del-filter", "bpf", idx, ":1", parent=parent, prio=TC_PRIO)
        except NetlinkError as exc:
            # The other side's detach removed the shared qdisc, and our
            # filter with it.
            if exc.code not in (errno.ENOENT, errno.EINVAL):
                raise


def acquire_lock(pin_dir: str):
    """One owner per pin directory: a second daemon on the same pins would
    sweep the same table twice and remove the pins from under the first.
    The lock dies with the process, so a SIGKILLed owner leaves none."""
    import fcntl

    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    f = open(_state_file(pin_dir).with_suffix(".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        f.seek(0)
        owner = f.read().strip() or "?"
        f.close()
        raise EnvironmentProblem(
            f"another ctstream (pid {owner}) already owns {pin_dir}; stop it first") from exc
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def remove_pins(pin_dir: str) -> None:
    if os.path.isdir(pin_dir):
        shutil.rmtree(pin_dir)
