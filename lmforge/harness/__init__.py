"""Evaluation through lm-evaluation-harness: `lmforge eval`, own files, shipped local tasks.

The harness is an optional dependency (`pip install lmforge[eval]`, part of `make setup`);
`require_harness` turns its absence into one line saying how to install it.
"""

from __future__ import annotations

from lmforge.errors import ConfigError

INSTALL = "pip install 'lmforge[eval]'  (or: pip install lm_eval)"


def require_harness() -> None:
    """Import lm_eval or raise one ConfigError line saying how to install it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"lmforge eval needs lm-evaluation-harness, which is not installed: {INSTALL}"
        ) from None
