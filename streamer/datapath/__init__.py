"""The kernel side as Python sees it: the event ABI (abi.py, the mirror of
bpf/ct_abi.h), loading and attaching the BPF programs (loader.py, bpfsys.py,
netns.py), the pinned table and its counters (table.py), the sweeper and the
outbox acks, the ring reader (ringbuf.py) and event decoding (events.py).
Imports nothing above it."""
