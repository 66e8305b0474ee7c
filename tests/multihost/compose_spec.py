"""Read what the per-PC compose files run: each service's module and its settings as flags.

No YAML library is a dependency of the project, so `load_yaml` reads the block-style subset
compose files are written in (mappings, lists, quoted and block scalars, flow lists, anchors,
aliases and `<<` merges). A service's command line is its image target's ENTRYPOINT in
docker/Dockerfile plus its settings: the target's ENV lines, then the service's `environment`,
with the variables taken from the .env that network_config.py writes, substituted as compose
does (`${VAR}`, `${VAR:-word}`, `${VAR:+word}` and the rest; a word may hold `${OTHER}`).
Every EV_X variable is the flag --x (that is how each service reads its environment), except
where the module's own parser names it otherwise.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_KEY = re.compile(r"^(?P<key>[^\s:#'\"][^:#]*?|\"[^\"]*\"|'[^']*'):(?:\s+(?P<rest>.*))?$")


def _strip_comment(line: str) -> str:
    quote = ""
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i].rstrip()
    return line.rstrip()


def _scalar(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return json.loads(text)
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if text in ("", "~", "null"):
        return None
    if text.startswith("["):
        try:
            return json.loads(text)
        except ValueError:
            return [_scalar(part) for part in text.strip("[]").split(",") if part.strip()]
    return text


class _Parser:
    def __init__(self, text: str) -> None:
        self.raw = text.splitlines()
        self.lines: list[tuple[int, int, str]] = []  # (raw index, indent, content)
        for index, line in enumerate(self.raw):
            content = _strip_comment(line)
            if content.strip() and content.strip() != "---":
                self.lines.append((index, len(content) - len(content.lstrip()), content.strip()))
        self.pos = 0
        self.anchors: dict[str, Any] = {}

    def parse(self) -> Any:
        if not self.lines:
            return None
        return self.block(self.lines[0][1])

    def block(self, indent: int) -> Any:
        if self.lines[self.pos][2].startswith("- ") or self.lines[self.pos][2] == "-":
            return self.sequence(indent)
        return self.mapping(indent)

    def mapping(self, indent: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while self.pos < len(self.lines):
            raw_index, line_indent, content = self.lines[self.pos]
            if line_indent < indent:
                break
            if line_indent > indent:
                raise ValueError(f"line {raw_index + 1}: unexpected indentation")
            match = _KEY.match(content)
            if not match:
                raise ValueError(f"line {raw_index + 1}: expected `key: value`: {content!r}")
            self.pos += 1
            key = _scalar(match["key"])
            value = self.value(match["rest"] or "", indent, raw_index)
            if key == "<<":
                for merged in value if isinstance(value, list) else [value]:
                    result = {**merged, **result}
            else:
                result[key] = value
        return result

    def sequence(self, indent: int) -> list[Any]:
        result: list[Any] = []
        while self.pos < len(self.lines):
            raw_index, line_indent, content = self.lines[self.pos]
            if line_indent != indent or not (content.startswith("- ") or content == "-"):
                if line_indent > indent:
                    raise ValueError(f"line {raw_index + 1}: unexpected indentation")
                break
            item = content[1:].strip()
            if _KEY.match(item) and not item.startswith(("'", '"')):
                # "- key: value" opens a mapping whose other keys line up with `key`.
                self.lines[self.pos] = (raw_index, indent + 2, item)
                result.append(self.mapping(indent + 2))
            else:
                self.pos += 1
                result.append(self.value(item, indent, raw_index))
        return result

    def value(self, rest: str, indent: int, raw_index: int) -> Any:
        anchor = None
        if rest.startswith("&"):
            anchor, _, rest = rest.partition(" ")
            anchor = anchor[1:]
            rest = rest.strip()
        if rest.startswith("*"):
            value = self.anchors[rest[1:].strip()]
        elif rest[:1] in ("|", ">"):
            value = self.block_scalar(indent, rest[0] == ">")
        elif rest:
            value = _scalar(rest)
        elif self.pos < len(self.lines) and self.lines[self.pos][1] > indent:
            value = self.block(self.lines[self.pos][1])
        elif self.pos < len(self.lines) and self.lines[self.pos][1] == indent:
            # A list may sit at its key's own indentation.
            value = self.sequence(indent) if self.lines[self.pos][2].startswith("-") else None
        else:
            value = None
        if anchor:
            self.anchors[anchor] = value
        return value

    def block_scalar(self, indent: int, folded: bool) -> str:
        start = self.lines[self.pos - 1][0] + 1
        body: list[str] = []
        end = start
        for raw_index in range(start, len(self.raw)):
            line = self.raw[raw_index]
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            body.append(line)
            end = raw_index + 1
        while self.pos < len(self.lines) and self.lines[self.pos][0] < end:
            self.pos += 1
        margin = min((len(x) - len(x.lstrip()) for x in body if x.strip()), default=0)
        text = [x[margin:] for x in body]
        return (" " if folded else "\n").join(text).strip() + "\n"


def load_yaml(text: str) -> Any:
    return _Parser(text).parse()


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _closing_brace(text: str, start: int) -> int:
    """Where the `}` that closes the `${` before `start` is (a word may hold ${...} itself)."""
    depth, i = 1, start
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
            continue
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError(f"unclosed ${{ in {text!r}")


def _expand(name: str, op: str, word: str, env: Mapping[str, str], missing: set[str]) -> str:
    value = env.get(name)
    unset = value is None or (op.startswith(":") and value == "")
    if op in (":-", "-"):
        return substitute(word, env, missing) if unset else str(value)
    if op in (":+", "+"):
        return "" if unset else substitute(word, env, missing)
    if value is None or (op in (":?", "?") and unset):
        # Compose warns about (or, with `?`, refuses) these; the comparison reports them.
        missing.add(name)
        return ""
    return value


def substitute(text: str, env: Mapping[str, str], missing: set[str]) -> str:
    """Compose's interpolation: ${VAR}, $VAR, $$, ${VAR:-word}, ${VAR-word}, ${VAR:+word},
    ${VAR+word}, ${VAR:?error}, ${VAR?error}; a word may hold ${OTHER} itself.

    A variable `env` lacks where compose would warn (or stop) goes into `missing`.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        at = text.find("$", i)
        if at < 0:
            out.append(text[i:])
            break
        out.append(text[i:at])
        if text.startswith("$$", at):
            out.append("$")
            i = at + 2
        elif text.startswith("${", at):
            name = _NAME.match(text, at + 2)
            if name is None:
                raise ValueError(f"bad ${{...}} in {text!r}")
            end = _closing_brace(text, name.end())
            rest = text[name.end() : end]
            op = next((o for o in (":-", ":+", ":?", "-", "+", "?") if rest.startswith(o)), "")
            if rest and not op:
                raise ValueError(f"bad ${{...}} in {text!r}")
            out.append(_expand(name.group(), op, rest[len(op) :], env, missing))
            i = end + 1
        else:
            name = _NAME.match(text, at + 1)
            if name is None:
                out.append("$")
                i = at + 1
            else:
                out.append(_expand(name.group(), "", "", env, missing))
                i = name.end()
    return "".join(out)


@dataclass
class Stage:
    name: str
    base: str
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None


def load_dockerfile(text: str) -> dict[str, Stage]:
    """Build stages by name: ENV (inherited from a parent stage), ENTRYPOINT and CMD."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    logical: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            logical.append(stripped[:-1])
            continue
        logical.append(stripped)
        instruction = " ".join(part for part in logical if part and not part.startswith("#"))
        logical = []
        word, _, args = instruction.partition(" ")
        word = word.upper()
        if word == "FROM":
            parts = args.split()
            base = parts[0]
            name = parts[2] if len(parts) >= 3 and parts[1].lower() == "as" else base
            current = Stage(name, base)
            parent = stages.get(base)
            if parent:
                current.env = dict(parent.env)
                current.entrypoint, current.cmd = parent.entrypoint, parent.cmd
            stages[name] = current
        elif current is None:
            continue
        elif word == "ENV":
            tokens = shlex.split(args)
            if tokens and "=" not in tokens[0]:
                current.env[tokens[0]] = " ".join(tokens[1:])
            else:
                for token in tokens:
                    key, _, value = token.partition("=")
                    current.env[key] = value
        elif word in ("ENTRYPOINT", "CMD"):
            try:
                value = json.loads(args)
            except ValueError:
                value = ["/bin/sh", "-c", args]
            if word == "ENTRYPOINT":
                current.entrypoint, current.cmd = value, None
            else:
                current.cmd = value
    return stages


@dataclass
class ComposeService:
    """One compose service as a command line: module, subcommand words, settings by flag."""

    file: str
    name: str
    module: str | None
    words: list[str]
    flags: dict[str, str]
    missing: set[str]


def env_to_flag(name: str) -> str:
    return "--" + name.removeprefix("EV_").lower().replace("_", "-")


def module_env_flags(module: str | None, words: list[str]) -> dict[str, str]:
    """The flag of each variable a module's main command line reads, as its parser says.

    Most variables are named after their flag; not all (the monitor's --secret reads
    EV_CP_SECRET). Subcommands (the dashboards) and other programs: none, use env_to_flag.
    """
    if module is None or words:
        return {}
    try:
        config = importlib.import_module(f"{module}.config")
    except ImportError:
        return {}
    parser = config.build_parser()
    return {env: "--" + dest.replace("_", "-") for dest, env in parser.env_names.items()}


def compose_services(
    compose_file: Path, stages: Mapping[str, Stage], dotenv: Mapping[str, str]
) -> list[ComposeService]:
    """The services of one compose file built from the project's Dockerfile."""
    doc = load_yaml(compose_file.read_text())
    services = []
    for name, spec in (doc.get("services") or {}).items():
        build = spec.get("build")
        target = build.get("target") if isinstance(build, dict) else None
        if target is None or target not in stages:
            continue  # not one of our images (Kafka, Kafka UI)
        stage = stages[target]
        missing: set[str] = set()
        settings = dict(stage.env)
        environment = spec.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for key, value in environment.items():
            settings[key] = substitute("" if value is None else str(value), dotenv, missing)
        command = [*(stage.entrypoint or []), *(spec.get("command") or stage.cmd or [])]
        module = None
        words: list[str] = []
        if "-m" in command:
            at = command.index("-m")
            module = command[at + 1]
            words = command[at + 2 :]
        named = module_env_flags(module, words)
        flags = {
            named.get(k) or env_to_flag(k): v for k, v in settings.items() if k.startswith("EV_")
        }
        services.append(ComposeService(compose_file.name, name, module, words, flags, missing))
    return services


def flags_of(args: list[str]) -> tuple[str, list[str], dict[str, str]]:
    """(module, subcommand words, {flag: value}) of `-m MODULE [words] --flag value ...`."""
    assert args[0] == "-m", args
    module, rest = args[1], args[2:]
    words: list[str] = []
    while rest and not rest[0].startswith("--"):
        words.append(rest.pop(0))
    flags: dict[str, str] = {}
    while rest:
        flag = rest.pop(0)
        flags[flag] = rest.pop(0) if rest and not rest[0].startswith("--") else "1"
    return module, words, flags


def port_of(address: str) -> str:
    return address.rpartition(":")[2]
