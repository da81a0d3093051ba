"""One exception hierarchy; every message is one a user can act on."""


class StreamerError(Exception):
    """Base of every error ctstream reports to the user."""


class ConfigError(StreamerError):
    """A configuration value is out of range or malformed. `setting` names
    the setting (its option without the dashes) when one value is at fault,
    so that the message can say where that value came from."""

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


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


class SpoolError(StreamerError):
    """The spool cannot be opened, read or written."""


class SpoolFull(SpoolError):
    """An append was refused: undelivered records already fill max_bytes."""


class SpoolUnwritable(SpoolFull):
    """An append was refused: the disk failed the last write (full, read-only,
    I/O error). Like a full spool, it passes."""


class SpoolWriteError(SpoolError):
    """A sync failed: the records appended since the last good sync are not
    durable and were discarded; the spool stays open."""


class KafkaUnavailable(StreamerError):
    """Kafka cannot be reached, or did not acknowledge records in time. The
    records of the failed call were not (all) acknowledged: spool them."""


class WireError(StreamerError):
    """A record cannot be encoded or decoded, or does not match the schema."""


class ArchiveError(StreamerError):
    """The archive cannot be opened or read."""


class DatabaseError(StreamerError):
    """The database cannot be reached, opened or written."""


class ExportError(StreamerError):
    """The IPFIX collector cannot be reached, refused what was sent, or did
    not acknowledge it: the records of the batch are not committed."""


class TestbedError(Exception):
    """A test-bed command failed, timed out, or a check did not hold (the
    demo's and the tests' namespaces and traffic; not a StreamerError)."""

    __test__ = False  # not a pytest test class
