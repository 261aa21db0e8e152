"""Errors meant for the user: the message says what is wrong and where (file, line, field or config key).
train.py and attribute.py print them without a traceback and exit with status 2."""


def whole(value, least=1):
    """Whether a config value is an integer >= least: not a bool (YAML reads yes / true as one), nor a float or a
    string. The checks that raise ConfigError share it."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


class LarkError(ValueError):
    """A problem with the input, the config or the run directory, not a bug in LARK."""


class DataError(LarkError):
    """Invalid input data; the message names the file, the line and the field."""


class ConfigError(LarkError):
    """An invalid config value; the message names the key."""


class StoreMismatch(LarkError):
    """Two gradient stores that were not produced the same way; the message names the differing field."""


class RunDirError(LarkError):
    """A run directory that is incomplete, partially written, or holds another run."""


class CorruptFile(RunDirError):
    """A file whose content no longer matches the checksum written with it (corrupted or truncated afterwards)."""


class DiskFull(RunDirError):
    """A write that failed for lack of space; nothing partial was kept."""
