"""What the command-line tools share: --key=value settings (nanoGPT style), argparse value types,
and an argparse parser whose errors are one line."""

import argparse


class ConfigError(ValueError):
    pass


def apply_overrides(settings, argv):
    """Apply --key=value arguments to the dict of settings, in place, and return the keys given.
    Values are parsed to the type of the default (bool accepts true/false/1/0); unknown keys and
    bad values raise ConfigError."""
    given = set()
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        if key not in settings:
            raise ConfigError(f"unknown setting {key!r} (known: {', '.join(sorted(settings))})")
        default = settings[key]
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                settings[key] = value.lower() in ("true", "1")
            else:
                settings[key] = type(default)(value)
        except ValueError:
            raise ConfigError(f"--{key} must be of type {type(default).__name__}, got {value!r}") from None
        given.add(key)
    return given


def positive_ints(text, example="4 or 1,4,16"):
    """'8' or '1,4,16' -> [8] or [1, 4, 16], for argparse's type=: every value must be a positive
    integer, or argparse.ArgumentTypeError (its message shows example)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers such as {example}, got {text!r}")
    return values


def positive_int(text):
    """A positive integer, for argparse's type=."""
    try:
        if int(text) >= 1:
            return int(text)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")


class Parser(argparse.ArgumentParser):
    """argparse, with errors as one line on stderr ("prog: message") instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}\n")
