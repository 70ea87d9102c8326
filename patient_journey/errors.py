"""The project's exceptions. Messages name the object and the rule, never patient values."""


class JourneyError(Exception):
    """Base class of every error patient-journey raises on purpose."""


class ConfigurationError(JourneyError):
    """A setting is missing or wrong; the message says which and how to set it."""


class SourceError(JourneyError):
    """A source could not be read as a whole (not one bad record: those are quarantined)."""


class ExpectationSuiteError(JourneyError):
    """An expectation suite file does not parse; raised before anything is loaded."""


class QualityGateError(JourneyError):
    """A table-level expectation of error severity failed: the run stops before loading."""


class StorageError(JourneyError):
    """A storage operation failed as a whole: the message names the operation and the container,
    never a key, token or connection string. ``transient`` says whether a retry could help."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
