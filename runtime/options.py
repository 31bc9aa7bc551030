"""Command-line options that fall back to `GPULEDGER_*` environment variables.

Every variable is declared once: as the fallback of one option (`add_env_option`,
`add_env_flag`), or, for a password, as an environment-only secret (`add_env_secret`). A
function that several commands share (`add_log_level_option`, `runtime.kafka.add_kafka_options`)
declares its variables once and each command calls it. The environment is read by the entry
point alone (`gpuledger_env`) and handed down as a mapping.

The help of such an option ends in `[env: NAME]`. A flag beats its variable. A set variable
becomes the option's default as text, and argparse converts a text default only for the
parser that runs: the variable is converted with the option's type and checked against its
choices only when its command is the one parsed, so a bad worker setting in a shared
ConfigMap does not stop `gpuledger agent` (nor any `--help`). A bad value ends the parse with
one line naming the variable, exit status 2:

    gpuledger worker: error: GPULEDGER_WINDOW_S='abc': invalid int value

An empty variable counts as unset. A secret's value never appears in `--help`, an error
message or a `repr`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

PREFIX = "GPULEDGER_"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL")

Convert = Callable[[str], Any]


def gpuledger_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The `GPULEDGER_*` variables of `environ`: what an entry point hands to its parser."""
    return {k: v for k, v in environ.items() if k.startswith(PREFIX)}


def parse_bool(text: str) -> bool:
    """1/true/yes/on or 0/false/no/off, in any case."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError("invalid boolean value (use 1/true/yes or 0/false/no)")


class EnvSecret:
    """A secret read from one variable (declared by `add_env_secret`); its text shows nowhere."""

    __slots__ = ("_value", "env")

    def __init__(self, env: str, value: str | None) -> None:
        self.env = env
        self._value = value or None

    def reveal(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return f"EnvSecret({self.env}, {'set' if self._value is not None else 'unset'})"


class _FromEnv(str):
    """A default that came from the variable, still text: argparse hands this very object to
    the option's `type` when it converts the default, which tells it from a flag's value."""


class _Converter:
    """The `type` argparse sees. A flag's value goes to the option's own `type`, and argparse
    reports its errors as usual; the variable's text goes to `EnvOption.from_env`."""

    def __init__(self, option: EnvOption, convert: Convert | None) -> None:
        self.option = option
        self.convert = convert
        self.__name__ = getattr(convert, "__name__", "str")  # argparse names it in errors

    def __call__(self, text: str) -> Any:
        if isinstance(text, _FromEnv):
            return self.option.from_env(text)
        return text if self.convert is None else self.convert(text)


class EnvOption(argparse.Action):
    """An option, stored once, whose default comes from the variable `env` (module docstring).
    Declare one with `add_env_option`."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        *,
        env: str,
        environ: Mapping[str, str],
        parser: argparse.ArgumentParser,
        secret: bool = False,
        default: Any = None,
        type: Convert | None = None,
        choices: Iterable[Any] | None = None,
        help: str | None = None,
        **kwargs: Any,
    ) -> None:
        if not env.startswith(PREFIX) or env == PREFIX:
            raise ValueError(f"{env!r} is not a {PREFIX}* variable")
        if secret and help and "%(default)" in help:
            raise ValueError(f"the help of secret {env} must not show its default")
        raw = environ.get(env, "")
        super().__init__(
            option_strings,
            dest,
            default=_FromEnv(raw) if raw.strip() else default,
            choices=choices,
            help=help if help == argparse.SUPPRESS else f"{help or ''} [env: {env}]".lstrip(),
            **kwargs,
        )
        self.env = env
        self.secret = secret
        self.parser = parser
        self.convert = type
        self.type = _Converter(self, type)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)

    def from_env(self, text: str) -> Any:
        """The variable's text as the option's value, or the parse ends naming the variable."""
        try:
            value = self.convert_env(text)
        except argparse.ArgumentTypeError as exc:
            self._reject(text, str(exc))
        except (TypeError, ValueError):
            self._reject(text, f"invalid {getattr(self.convert, '__name__', 'str')} value")
        if self.choices is not None:
            for item in value if isinstance(value, list) else [value]:
                if item not in self.choices:
                    allowed = ", ".join(str(c) for c in self.choices)
                    self._reject(text, f"invalid choice (choose from {allowed})")
        return value

    def convert_env(self, text: str) -> Any:
        return str(text) if self.convert is None else self.convert(str(text))

    def _reject(self, text: str, problem: str) -> NoReturn:
        shown = "(hidden)" if self.secret else repr(str(text))
        message = f"{self.env}={shown}: {problem}"
        if self.parser.exit_on_error:
            self.parser.exit(2, f"{self.parser.prog}: error: {message}\n")
        raise argparse.ArgumentError(None, message)


class EnvList(EnvOption):
    """A repeatable option: the first flag replaces the variable's list, later ones add to it;
    the variable lists its values with `separator`."""

    def __init__(self, *args: Any, separator: str = ",", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.separator = separator

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        items = getattr(namespace, self.dest, None)
        if items is self.default or not isinstance(items, list):
            items = []  # the first flag: not the variable's list, nor the shared default
        setattr(namespace, self.dest, [*items, values])

    def convert_env(self, text: str) -> Any:
        items = [item.strip() for item in str(text).split(self.separator) if item.strip()]
        return [item if self.convert is None else self.convert(item) for item in items]


class EnvFlag(EnvOption):
    """`--name` sets True, `--no-name` False; the variable takes 1/true/yes or 0/false/no."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, nargs=0, **kwargs)
        self.convert = parse_bool

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no-"))


def add_env_option(
    parser: argparse.ArgumentParser,
    environ: Mapping[str, str],
    *flags: str,
    env: str,
    default: Any = None,
    type: Convert | None = None,
    choices: Iterable[Any] | None = None,
    help: str | None = None,
    metavar: str | None = None,
    dest: str | None = None,
    secret: bool = False,
    separator: str | None = None,
) -> EnvOption:
    """`parser.add_argument(*flags, ...)` with the variable `env` of `environ` as fallback.

    `type` and `choices` apply to flag and variable alike. With `separator` the option is
    repeatable and the variable holds a list (e.g. `k=v,k=v`); its default is then a list.
    `secret`: the variable's text is never shown (help must not use `%(default)s`)."""
    kwargs: dict[str, Any] = {"metavar": metavar}
    if dest is not None:
        kwargs["dest"] = dest
    if separator is not None:
        kwargs["separator"] = separator
    if type is not None:
        kwargs["type"] = type
    action = parser.add_argument(
        *flags,
        action=EnvOption if separator is None else EnvList,
        env=env,
        environ=environ,
        parser=parser,
        default=default,
        choices=choices,
        help=help,
        secret=secret,
        **kwargs,
    )
    assert isinstance(action, EnvOption)
    return action


def add_env_flag(
    parser: argparse.ArgumentParser,
    environ: Mapping[str, str],
    flag: str,
    *,
    env: str,
    default: bool = False,
    help: str | None = None,
) -> EnvOption:
    """A boolean `--flag` / `--no-flag` with the variable `env` as fallback."""
    if not flag.startswith("--"):
        raise ValueError(f"a boolean option is a long flag, got {flag!r}")
    action = parser.add_argument(
        flag,
        "--no-" + flag[2:],
        action=EnvFlag,
        env=env,
        environ=environ,
        parser=parser,
        default=default,
        help=help,
    )
    assert isinstance(action, EnvOption)
    return action


def add_env_secret(
    parser: argparse.ArgumentParser, environ: Mapping[str, str], *, env: str, dest: str
) -> EnvSecret:
    """A secret taken from the variable alone, never from a flag (a command line is visible
    to every user of the host): `args.<dest>` is an `EnvSecret`."""
    if not env.startswith(PREFIX) or env == PREFIX:
        raise ValueError(f"{env!r} is not a {PREFIX}* variable")
    secret = EnvSecret(env, environ.get(env))
    parser.set_defaults(**{dest: secret})
    return secret


def add_log_level_option(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    add_env_option(
        parser,
        environ,
        "--log-level",
        env="GPULEDGER_LOG_LEVEL",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)",
    )


def declared_variables(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    """Each variable that `parser` and its subcommands declare -> where, as `PROG --flag`
    (`PROG` alone for a secret without a flag)."""
    found: dict[str, set[str]] = {}
    seen: set[int] = set()

    def walk(p: argparse.ArgumentParser) -> None:
        if id(p) in seen:
            return
        seen.add(id(p))
        for action in p._actions:
            if isinstance(action, EnvOption):
                found.setdefault(action.env, set()).add(f"{p.prog} {action.option_strings[0]}")
            elif isinstance(action, argparse._SubParsersAction):
                for child in action._name_parser_map.values():
                    walk(child)
        for value in p._defaults.values():
            if isinstance(value, EnvSecret):
                found.setdefault(value.env, set()).add(p.prog)

    walk(parser)
    return found
