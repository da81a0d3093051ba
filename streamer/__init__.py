"""ctstream: a reliable conntrack event streamer (XDP/eBPF + asyncio)."""

__version__ = "0.1.0"
