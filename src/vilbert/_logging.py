"""Logging set-up for the CLI and rate-limited warnings for library code."""

import logging
import sys
import time

_last_logged: dict[tuple[str, str], float] = {}
_counts: dict[tuple[str, str], int] = {}


def setup_logging(level: str = "INFO", log_file: str | None = None) -> None:
    """Configure the root 'vilbert' logger. Only cli.py calls this."""
    logger = logging.getLogger("vilbert")
    logger.setLevel(level.upper())
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger.propagate = False


def log_first_n(logger: logging.Logger, level: int, msg: str, n: int = 1, key: str | None = None) -> None:
    """Log `msg` only the first `n` times it is seen (keyed by `key` or the message)."""
    k = (logger.name, key or msg)
    _counts[k] = _counts.get(k, 0) + 1
    if _counts[k] <= n:
        logger.log(level, msg)


def log_every_n_seconds(logger: logging.Logger, level: int, msg: str, n_s: float = 5.0, key: str | None = None) -> None:
    """Log `msg` at most once every `n_s` seconds (keyed by `key` or the message)."""
    k = (logger.name, key or msg)
    now = time.monotonic()
    if now - _last_logged.get(k, -1e18) >= n_s:
        _last_logged[k] = now
        logger.log(level, msg)
