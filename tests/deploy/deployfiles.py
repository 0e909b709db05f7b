"""Readers for the deployment files (deploy/, the Dockerfile) and the checks the compose file and
the Kubernetes manifests share: an ``ordergate`` command parsed by the CLI's own parser, its
settings loaded by ``Settings.load`` from the environment the file gives it."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ordergate.cli import _parser
from ordergate.components import gateway_config
from ordergate.gateway.app import create_app
from ordergate.settings import ENV_PREFIX, Settings, _is_tooling_variable

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "env.example"
SCHEMA = Path(__file__).with_name("compose-spec.json")

# What the four secrets of env.example stand for in the tests: hex, as the README advises.
TEST_SECRET = "0123456789abcdef" * 2


# --- Compose: interpolation -----------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_]\w*))")


class MissingVariable(Exception):
    """``${VAR:?message}`` with VAR unset or empty: ``docker compose`` refuses the file."""


def variables(text: str) -> list[tuple[str, str, str]]:
    """Every ``${NAME<op>word}`` of the text: (name, op, word); op is "" for a bare ``${NAME}``."""
    found = []
    for m in _VAR.finditer(text):
        if m[0] == "$$":
            continue
        found.append((m[1] or m[4], m[2] or "", m[3] or ""))
    return found


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation of every string in a parsed file (the spec's forms: ``$$``,
    ``$NAME``, ``${NAME}``, ``${NAME:-default}``, ``${NAME-default}``, ``${NAME:?err}``,
    ``${NAME?err}``, ``${NAME:+alt}``, ``${NAME+alt}``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m[0] == "$$":
            return "$"
        name, op, word = m[1] or m[4], m[2] or "", m[3] or ""
        current = env.get(name)
        unset_or_empty = not current
        if op in (":-", "-"):
            missing = unset_or_empty if op == ":-" else current is None
            return word if missing else str(current)
        if op in (":?", "?"):
            missing = unset_or_empty if op == ":?" else current is None
            if missing:
                raise MissingVariable(f"{name}: {word}")
            return str(current)
        if op in (":+", "+"):
            present = not unset_or_empty if op == ":+" else current is not None
            return word if present else ""
        return current or ""

    return _VAR.sub(one, value)


def env_example() -> dict[str, str]:
    """deploy/env.example as compose reads a .env file: NAME=VALUE lines, # comments."""
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def filled_env() -> dict[str, str]:
    """env.example with its empty secrets filled in, as an operator's deploy/.env would be."""
    env = env_example()
    for name in SECRETS:
        env[name] = TEST_SECRET
    return env


SECRETS = (
    "VALKEY_PASSWORD",
    "POSTGRES_PASSWORD",
    "ORDERGATE_ADMIN_TOKEN",
    "GRAFANA_ADMIN_PASSWORD",
)


def raw_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file, parsed (YAML anchors and merge keys resolved) and interpolated."""
    data = interpolate(raw_compose(), filled_env() if env is None else env)
    assert isinstance(data, dict)
    return data


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, from either of compose's two forms."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def is_ordergate(service: Mapping[str, Any]) -> bool:
    """A service of the image built from the Dockerfile."""
    return "build" in service or service.get("image") == "ordergate:local"


# --- The ordergate command ------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """An ``ordergate`` command line: its parsed arguments and the settings its process loads."""

    argv: list[str]
    args: argparse.Namespace
    settings: Settings

    @property
    def name(self) -> str:
        return str(self.args.command)


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(name)
            assert sub is not None, f"ordergate has no command {name!r}"
            return sub
    raise AssertionError("ordergate's parser has no sub-commands")


def parse_command(argv: list[str], env: Mapping[str, str]) -> Command:
    """Parse ``argv`` with ``ordergate``'s own parser and load its settings from ``env``, the
    container's environment. Fails on an unknown command, an unknown or abbreviated option
    (argparse would take a unique prefix of a renamed flag), an ``ORDERGATE_*`` variable that
    names no setting, and a value the settings refuse."""
    assert argv and argv[0] == "ordergate", f"not an ordergate command: {argv}"
    words = [str(w) for w in argv[1:]]
    assert words, "ordergate needs a command"
    sub = subcommand_parser(words[0])
    for word in words[1:]:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            assert flag in sub._option_string_actions, f"ordergate {words[0]} has no {flag}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = _parser().parse_args(words)
    except SystemExit:
        raise AssertionError(f"ordergate {' '.join(words)}: {err.getvalue().strip()}") from None
    unknown = [
        k
        for k in env
        if k.startswith(ENV_PREFIX)
        and not _is_tooling_variable(k)
        and k[len(ENV_PREFIX) :].lower() not in SETTING_NAMES
    ]
    assert not unknown, f"no such settings: {unknown}"
    overrides = {n: getattr(args, n, None) for n in ("host", "port", "processes", "workers")}
    settings = Settings.load(overrides, environ={k: v for k, v in env.items()})
    return Command(list(argv), args, settings)


SETTING_NAMES = frozenset(Settings.__struct_fields__)


def gateway_routes() -> dict[str, set[str]]:
    """The gateway's routes: path -> methods (the Starlette app itself, not started)."""
    app = create_app(gateway_config(Settings.load(environ={"ORDERGATE_REDIS_URL": "redis://x"})))
    return {r.path: set(r.methods or ()) for r in app.routes}  # type: ignore[attr-defined]


# --- nginx ----------------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def all(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> Directive:
        (found,) = self.all(name)
        return found

    def walk(self) -> Iterator[Directive]:
        for d in self.block or []:
            yield d
            yield from d.walk()


_NGINX_TOKEN = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|([{};])|([^\s{};'"]+)""")


def nginx(path: Path) -> Directive:
    """nginx.conf as a tree of directives (enough of its grammar for deploy/nginx.conf)."""
    text = "\n".join(re.sub(r"^\s*#.*$|\s#.*$", "", line) for line in path.read_text().splitlines())
    root = Directive("", [], [])
    stack = [root]
    words: list[str] = []
    for m in _NGINX_TOKEN.finditer(text):
        quoted, dquoted, punct, word = m.groups()
        if punct == ";":
            stack[-1].block.append(Directive(words[0], words[1:]))  # type: ignore[union-attr]
            words = []
        elif punct == "{":
            d = Directive(words[0], words[1:], [])
            stack[-1].block.append(d)  # type: ignore[union-attr]
            stack.append(d)
            words = []
        elif punct == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
        else:
            words.append(quoted if quoted is not None else dquoted if dquoted is not None else word)
    assert len(stack) == 1 and not words, "unbalanced braces in nginx.conf"
    return root


def nginx_size(text: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", text)
    assert m, f"not an nginx size: {text}"
    return int(m[1]) * units[m[2].lower()]


def nginx_seconds(text: str) -> float:
    units = {"ms": 0.001, "": 1, "s": 1, "m": 60, "h": 3600}
    m = re.fullmatch(r"(\d+)(ms|s|m|h|)", text)
    assert m, f"not an nginx time: {text}"
    return int(m[1]) * units[m[2]]


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (INSTRUCTION, rest), continuation lines joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        instruction, _, rest = current.strip().partition(" ")
        out.append((instruction.upper(), rest.strip()))
        current = ""
    return out


def exec_form(rest: str) -> list[str]:
    """The JSON array of an exec-form instruction (CMD, ENTRYPOINT, HEALTHCHECK ... CMD)."""
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value
