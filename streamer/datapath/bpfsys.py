"""Thin ctypes layer over libbpf (libbpf.so.1): what BCC 0.26 does not wrap.

BPF_PROG_TEST_RUN (the sweeper's tick, the BPF unit tests), pinned objects
(`ctstream list` and `stats` read the maps of a running daemon without
compiling anything), plain map access by fd, and libbpf's ring buffer reader.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from typing import Callable, Iterator

from ..errors import EnvironmentProblem, StreamerError

_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            _lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot load libbpf ({name}): install Debian's libbpf1 (scripts/setup.sh does)"
            ) from exc
        _declare(_lib)
    return _lib


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.x)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class MapCreateOpts(ctypes.Structure):
    """The leading fields of struct bpf_map_create_opts (libbpf 1.x); sz
    says how many we pass, and libbpf takes the rest as zero."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32),
        ("map_ifindex", ctypes.c_uint32),
    ]


class XdpAttachOpts(ctypes.Structure):
    """struct bpf_xdp_attach_opts (libbpf 1.x)."""

    _fields_ = [("sz", ctypes.c_size_t), ("old_prog_fd", ctypes.c_int)]


RING_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _declare(L: ctypes.CDLL) -> None:
    vp, u32, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int
    L.bpf_prog_test_run_opts.argtypes = [i32, ctypes.POINTER(TestRunOpts)]
    L.bpf_obj_get.argtypes = [ctypes.c_char_p]
    L.bpf_obj_pin.argtypes = [i32, ctypes.c_char_p]
    L.bpf_map_lookup_elem.argtypes = [i32, vp, vp]
    L.bpf_map_update_elem.argtypes = [i32, vp, vp, ctypes.c_uint64]
    L.bpf_map_delete_elem.argtypes = [i32, vp]
    L.bpf_map_get_next_key.argtypes = [i32, vp, vp]
    L.libbpf_num_possible_cpus.argtypes = []
    L.bpf_xdp_attach.argtypes = [i32, i32, u32, ctypes.POINTER(XdpAttachOpts)]
    L.bpf_xdp_query_id.argtypes = [i32, i32, ctypes.POINTER(u32)]
    L.bpf_prog_get_fd_by_id.argtypes = [u32]
    L.bpf_obj_get_info_by_fd.argtypes = [i32, vp, ctypes.POINTER(u32)]
    L.bpf_map_create.argtypes = [i32, ctypes.c_char_p, u32, u32, u32, ctypes.POINTER(MapCreateOpts)]
    L.ring_buffer__new.restype = vp
    L.ring_buffer__new.argtypes = [i32, RING_CB, vp, vp]
    L.ring_buffer__consume.argtypes = [vp]
    L.ring_buffer__epoll_fd.argtypes = [vp]
    L.ring_buffer__free.argtypes = [vp]
    for f in ("bpf_xdp_attach", "bpf_xdp_query_id", "bpf_prog_get_fd_by_id",
              "bpf_obj_get_info_by_fd", "bpf_map_create", "bpf_prog_test_run_opts", "bpf_obj_get", "bpf_obj_pin", "bpf_map_lookup_elem",
              "bpf_map_update_elem", "bpf_map_delete_elem", "bpf_map_get_next_key",
              "ring_buffer__consume", "ring_buffer__epoll_fd"):
        getattr(L, f).restype = i32
    del u32


def _errno(rc: int) -> int:
    """libbpf 1.x returns -errno and also sets errno."""
    return -rc if rc < 0 else ctypes.get_errno()


def test_run(prog_fd: int, data: bytes, repeat: int = 1) -> tuple[int, int, bytes]:
    """Run a program on `data` `repeat` times in one syscall.
    Returns (retval, mean duration in ns, data_out of the last run)."""
    buf_in = ctypes.create_string_buffer(data, len(data))
    out_len = max(len(data) + 256, 512)
    buf_out = ctypes.create_string_buffer(out_len)
    o = TestRunOpts()
    o.sz = ctypes.sizeof(o)
    o.data_in = ctypes.cast(buf_in, ctypes.c_void_p)
    o.data_size_in = len(data)
    o.data_out = ctypes.cast(buf_out, ctypes.c_void_p)
    o.data_size_out = out_len
    o.repeat = max(1, int(repeat))
    rc = lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(o))
    if rc != 0:
        e = _errno(rc)
        raise StreamerError(f"BPF_PROG_TEST_RUN failed: {os.strerror(e)}")
    return o.retval, o.duration, buf_out.raw[: o.data_size_out]


def obj_get(path: str) -> int:
    fd = lib().bpf_obj_get(path.encode())
    if fd < 0:
        e = _errno(fd)
        raise FileNotFoundError(e, os.strerror(e), path)
    return fd


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    kb = ctypes.create_string_buffer(key, len(key))
    vb = ctypes.create_string_buffer(value_size)
    rc = lib().bpf_map_lookup_elem(fd, kb, vb)
    if rc != 0:
        if _errno(rc) == errno.ENOENT:
            return None
        raise StreamerError(f"map lookup failed: {os.strerror(_errno(rc))}")
    return vb.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    kb = ctypes.create_string_buffer(key, len(key))
    vb = ctypes.create_string_buffer(value, len(value))
    rc = lib().bpf_map_update_elem(fd, kb, vb, flags)
    if rc != 0:
        raise StreamerError(f"map update failed: {os.strerror(_errno(rc))}")


def map_delete(fd: int, key: bytes) -> bool:
    kb = ctypes.create_string_buffer(key, len(key))
    rc = lib().bpf_map_delete_elem(fd, kb)
    if rc != 0:
        if _errno(rc) == errno.ENOENT:
            return False
        raise StreamerError(f"map delete failed: {os.strerror(_errno(rc))}")
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Iterate the keys of a hash map. Under concurrent deletes the kernel
    restarts from the first key, so a key may come twice; callers dedupe."""
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        rc = lib().bpf_map_get_next_key(fd, cur, nxt)
        if rc != 0:
            if _errno(rc) == errno.ENOENT:
                return
            raise StreamerError(f"map iteration failed: {os.strerror(_errno(rc))}")
        k = nxt.raw
        yield k
        cur = ctypes.create_string_buffer(k, key_size)


MAP_TYPE_ARRAY, MAP_TYPE_ARRAY_OF_MAPS = 2, 12
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE, XDP_FLAGS_REPLACE = 1 << 1, 1 << 2, 1 << 4


def xdp_attach(ifindex: int, prog_fd: int, flags: int, old_prog_fd: int | None = None) -> None:
    """Attach (or with old_prog_fd: replace, in one step, exactly that
    program; the kernel refuses with EEXIST if another one is there now)
    an XDP program, in the calling thread's network namespace."""
    opts = None
    if old_prog_fd is not None:
        opts = XdpAttachOpts(ctypes.sizeof(XdpAttachOpts), old_prog_fd)
        flags |= XDP_FLAGS_REPLACE
    rc = lib().bpf_xdp_attach(ifindex, prog_fd, flags, ctypes.byref(opts) if opts else None)
    if rc != 0:
        e = _errno(rc)
        raise OSError(e, os.strerror(e))


def xdp_prog_id(ifindex: int, flags: int) -> int:
    """The id of the XDP program attached in that mode, 0 if none."""
    pid = ctypes.c_uint32(0)
    rc = lib().bpf_xdp_query_id(ifindex, flags, ctypes.byref(pid))
    if rc != 0:
        e = _errno(rc)
        raise OSError(e, os.strerror(e))
    return pid.value


def prog_fd_by_id(prog_id: int) -> int:
    fd = lib().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        e = _errno(fd)
        raise OSError(e, os.strerror(e))
    return fd


def map_info(fd: int) -> dict:
    """type, id, key_size, value_size, max_entries and flags of a map (the
    first fields of struct bpf_map_info)."""
    buf = ctypes.create_string_buffer(24)
    n = ctypes.c_uint32(24)
    rc = lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(n))
    if rc != 0:
        e = _errno(rc)
        raise OSError(e, os.strerror(e))
    names = ("type", "id", "key_size", "value_size", "max_entries", "map_flags")
    return dict(zip(names, (int.from_bytes(buf.raw[i:i + 4], "little") for i in range(0, 24, 4))))


def prog_id_tag(fd: int) -> tuple[int, bytes]:
    """A program's id and tag (the hash of its instructions), from the
    first fields of struct bpf_prog_info."""
    buf = ctypes.create_string_buffer(16)
    n = ctypes.c_uint32(16)
    rc = lib().bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(n))
    if rc != 0:
        e = _errno(rc)
        raise OSError(e, os.strerror(e))
    return int.from_bytes(buf.raw[4:8], "little"), buf.raw[8:16]


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               inner_map_fd: int = 0) -> int:
    o = MapCreateOpts()
    o.sz = ctypes.sizeof(o)
    o.inner_map_fd = inner_map_fd
    fd = lib().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries,
                              ctypes.byref(o))
    if fd < 0:
        raise StreamerError(f"cannot make the BPF map {name}: {os.strerror(_errno(fd))}")
    return fd


class ProgramsBarrier:
    """Waits until every BPF program running at the call has finished.

    An update of a map-in-map element makes the kernel wait for an RCU
    grace period before the syscall returns (kernel/bpf/syscall.c,
    maybe_wait_bpf_programs), and XDP and tc programs run inside RCU read
    sections: once wait() returns, no program still works with a value it
    read before the call. The maps are this process's own, never pinned."""

    def __init__(self):
        self._inner = map_create(MAP_TYPE_ARRAY, "ct_rcu_inner", 4, 4, 1)
        try:
            self._outer = map_create(MAP_TYPE_ARRAY_OF_MAPS, "ct_rcu_outer", 4, 4, 1,
                                     inner_map_fd=self._inner)
        except BaseException:
            os.close(self._inner)
            raise
        self._key = (0).to_bytes(4, "little")
        self._value = self._inner.to_bytes(4, "little")

    def wait(self) -> None:
        map_update(self._outer, self._key, self._value)

    def close(self) -> None:
        for fd in (self._outer, self._inner):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._outer = self._inner = -1


def possible_cpus() -> int:
    n = lib().libbpf_num_possible_cpus()
    if n <= 0:
        raise EnvironmentProblem("cannot read the number of possible CPUs")
    return n


def percpu_lookup(fd: int, key: bytes, value_size: int) -> list[bytes]:
    """A per-CPU map's value for every possible CPU (each rounded up to 8)."""
    ncpu = possible_cpus()
    stride = (value_size + 7) & ~7
    raw = map_lookup(fd, key, stride * ncpu)
    if raw is None:
        return []
    return [raw[i * stride: i * stride + value_size] for i in range(ncpu)]


class RingBuffer:
    """libbpf's ring buffer consumer on one BPF_MAP_TYPE_RINGBUF map fd.

    `epoll_fd` becomes readable when records are waiting; `consume()` hands
    each record (a memoryview valid only during the call) to `on_record`.
    """

    def __init__(self, map_fd: int, on_record: Callable[[memoryview], None]):
        self._on_record = on_record
        self._error: BaseException | None = None
        self._left = -1
        self._cb = RING_CB(self._trampoline)  # keep a reference: C holds it
        ptr = lib().ring_buffer__new(map_fd, self._cb, None, None)
        if not ptr:
            e = ctypes.get_errno()
            raise StreamerError(f"cannot open the event ring: {os.strerror(e)}")
        self._rb = ptr

    def _trampoline(self, _ctx, data, size):
        try:
            self._on_record(memoryview((ctypes.c_char * size).from_address(data)).cast("B"))
        except BaseException as exc:  # never unwind through C
            self._error = exc
            return -1
        self._left -= 1
        # A negative return makes libbpf store the consumer position past
        # this record (it was handled) and return: how a limit is kept.
        return -errno.EAGAIN if self._left == 0 else 0

    @property
    def epoll_fd(self) -> int:
        return lib().ring_buffer__epoll_fd(self._rb)

    def consume(self, limit: int = 0) -> int:
        """Hand on the waiting records, at most `limit` of them (0: all);
        returns how many were handed on."""
        self._left = limit if limit > 0 else -1
        n = lib().ring_buffer__consume(self._rb)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if n == -errno.EAGAIN and self._left == 0:
            return limit
        if n < 0 and -n != errno.EINTR:
            raise StreamerError(f"reading the event ring failed: {os.strerror(-n)}")
        return max(n, 0)

    def close(self) -> None:
        if self._rb:
            lib().ring_buffer__free(self._rb)
            self._rb = None
