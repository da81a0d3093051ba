"""One exception hierarchy; every message is one a user can act on."""


class StreamerError(Exception):
    """Base of every error ctstream reports to the user."""


class ConfigError(StreamerError):
    """A configuration value is out of range or malformed."""


class EnvironmentProblem(StreamerError):
    """The machine cannot run the datapath: not root, no BPF, no bpffs, no headers."""


class InterfaceError(StreamerError):
    """An interface does not exist or a program cannot be attached to it."""


class LoadError(StreamerError):
    """The BPF programs failed to compile or to pass the verifier."""


class NotAttachedError(StreamerError):
    """No pinned datapath was found (nothing is attached)."""


class AbiError(StreamerError):
    """A record from the kernel has a type, version or length we do not know."""
