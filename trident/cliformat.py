"""The help formatter every ``trident`` command's parser uses: each option's help states
its default.

An option whose help already says "default" is left as written; otherwise a concrete
default is appended as ``(default: VALUE)`` and an on/off flag gets ``(default: off)``.
An option whose default is None or an empty list must say in its help what happens
without it (``tests/unit/test_cli_help.py`` checks every option of every command).
Standard library only: the daemons, the pipelines and the benchmarks all import it.
"""

from __future__ import annotations

import argparse

__all__ = ["DefaultsHelpFormatter"]


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """ArgumentDefaultsHelpFormatter without "(default: None)" or a second default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        if not action.option_strings or action.required:
            return text
        if action.nargs == 0 and isinstance(action.default, bool):  # store_true / _false
            return f"{text} (default: {'on' if action.default else 'off'})"
        if action.default is None or action.default == []:
            return text
        return f"{text} (default: %(default)s)"
