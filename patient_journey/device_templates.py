"""Device templates: a device type's message mapping is a JSON file, not code.

The format is the device-content template format of the open-source Azure IoMT FHIR connector
(microsoft/iomt-fhir), so its templates load as they are. A file holds one ``CollectionContent``
template (a list of content templates) or one content template on its own:

- ``JsonPathContent``: JSONPath expressions. ``typeMatchExpression`` runs over the whole event
  (``{"Body": ..., "Properties": ..., "SystemProperties": ...}``); every other expression runs
  over the token it matched.
- ``IotJsonPathContent``: messages as the IoT Hub device SDK sends them. The matched token is
  the event, values live under ``$.Body``; the device id is ``SystemProperties``
  ``iothub-connection-device-id``; the time is ``Properties`` ``iothub-creation-time-utc`` (the
  device's own clock), else ``SystemProperties`` ``iothub-enqueuedtime``, as the connector does.
- ``IotCentralJsonPathContent``: IoT Central data export; device id ``$.deviceId`` and time
  ``$.enqueuedTime`` of the matched token.
- ``CalculatedContent``: expressions run over the event plus the match as ``matchedToken``; each
  expression may be ``"..."`` or ``{"value": "...", "language": "JsonPath" | "JmesPath"}``
  (``defaultExpressionLanguage`` sets the template's default). JMESPath has the connector's
  extra functions (add, subtract, multiply, divide, pow, insertString, fromUnixTimestamp,
  fromUnixTimestampMs).

Fields: typeName, typeMatchExpression, deviceIdExpression, timestampExpression,
patientIdExpression, encounterIdExpression, correlationIdExpression and
values[{valueName, valueExpression, required}]; plus our own ``caseIdExpression`` (the OR case or
session id a surgical device records; required in the message when the template declares it, as
the connector treats correlationIdExpression). Template type names match case-insensitively with
or without the ``Template`` suffix, as in the connector.

Where this differs from the connector, on purpose:
- loading is strict: any invalid template (unknown templateType, missing or unknown field, bad
  expression, unknown JMESPath function) fails the whole load with a ConfigurationError naming the
  file, before any message is read. The connector skips the bad entry and runs the rest.
- FHIR mapping templates (``CollectionFhir``, ``CodeValueFhir``) are rejected with a clear error:
  patient-journey writes no FHIR Observations, so such a file in a device template folder is a
  mistake.
- a message is mapped atomically: if any matched template lacks a required field, the message
  yields no rows, only rejects (rule ``device_template_required_value``), so a quarantined
  message is never half loaded.
- timestamps are ISO-8601 strings (a time without an offset is taken as UTC).

JSONPath is Newtonsoft's dialect (``$..[?(@heartRate)]``, ``@a && @b``, ``@a || @b``,
``[?(@.name == 'x')]``, dotted names with hyphens), compiled once per template and evaluated by
python-jsonpath, with two shortcuts that keep Newtonsoft's results:
- a plain member path (``$.a.b-c``, ``$['a b']``) is a direct lookup;
- Newtonsoft's ``$..[?(f)]`` tests every node, the root too (an IoT Hub event matched by
  ``@Body.x``), and a node lacking the members ``f`` tests never matches. Such a type match runs
  ``$[?(f)]`` over the message's objects and arrays, listed by one walk per message for all
  templates, skipping objects with none of the members ``f`` names. Any other expression starting
  ``$..[?`` runs from python-jsonpath's pseudo-root ``^``, which also tests the root.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jmespath
import jsonpath
from jmespath import functions as jmespath_functions

from patient_journey.errors import ConfigurationError

RULE_NO_TEMPLATE = "device_template_matches"
RULE_REQUIRED_VALUE = "device_template_required_value"

COLLECTION = "CollectionContent"
JSONPATH = "JsonPathContent"
IOT = "IotJsonPathContent"
IOT_CENTRAL = "IotCentralJsonPathContent"
CALCULATED = "CalculatedContent"
CONTENT_KINDS: tuple[str, ...] = (JSONPATH, IOT, IOT_CENTRAL, CALCULATED)
_KINDS = {kind.lower(): kind for kind in (COLLECTION, *CONTENT_KINDS)}
_FHIR_KINDS = {"collectionfhir": "CollectionFhir", "codevaluefhir": "CodeValueFhir"}

JSONPATH_LANGUAGE = "JsonPath"
JMESPATH_LANGUAGE = "JmesPath"
_LANGUAGES = {JSONPATH_LANGUAGE.lower(): JSONPATH_LANGUAGE, JMESPATH_LANGUAGE.lower(): JMESPATH_LANGUAGE}

# Fixed expressions of the IoT template kinds (the connector's, over the matched token).
IOT_DEVICE_ID = "$.SystemProperties.iothub-connection-device-id"
IOT_TIMESTAMPS = ("$.Properties.iothub-creation-time-utc", "$.SystemProperties.iothub-enqueuedtime")
IOT_CENTRAL_DEVICE_ID = "$.deviceId"
IOT_CENTRAL_TIMESTAMP = "$.enqueuedTime"
MATCH_PROPERTY = "matchedToken"

_OPTIONAL_IDS = (
    "patientIdExpression",
    "encounterIdExpression",
    "correlationIdExpression",
    "caseIdExpression",
)
_FIELDS_BY_KIND: dict[str, tuple[str, ...]] = {
    JSONPATH: ("typeName", "typeMatchExpression", "deviceIdExpression", "timestampExpression", "values"),
    IOT: ("typeName", "typeMatchExpression", "values"),
    IOT_CENTRAL: ("typeName", "typeMatchExpression", "values"),
    CALCULATED: ("typeName", "typeMatchExpression", "deviceIdExpression", "timestampExpression", "values"),
}
_VALUE_FIELDS = ("valueName", "valueExpression", "required")

# IoT Hub names its system properties one way when it routes messages to storage (Avro/JSON
# blobs) and another on its Event Hub-compatible endpoint, which the connector's templates use.
ROUTED_SYSTEM_PROPERTIES: dict[str, str] = {
    "connectionDeviceId": "iothub-connection-device-id",
    "connectionModuleId": "iothub-connection-module-id",
    "connectionAuthMethod": "iothub-connection-auth-method",
    "connectionDeviceGenerationId": "iothub-connection-auth-generation-id",
    "enqueuedTime": "iothub-enqueuedtime",
    "messageId": "message-id",
    "correlationId": "correlation-id",
    "userId": "user-id",
    "contentType": "iothub-content-type",
    "contentEncoding": "iothub-content-encoding",
}

Scalar = str | int | float | bool


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Measurement:
    """One value of one matched template: the grain is one row per value per match per message."""

    message: int  # index of the message in the mapped batch
    match: int  # which template match inside the message (0, 1, ...): one measurement per match
    type_name: str
    template: str  # the template file's name
    device_id: str
    case_id: str | None
    correlation_id: str | None
    patient_id: str | None
    encounter_id: str | None
    measured_at: datetime  # UTC
    value_name: str
    value: Scalar  # as the message gave it (or as a JMESPath expression computed it)


@dataclass(frozen=True, slots=True)
class MappingReject:
    """Why one message gave no rows. ``detail`` names the template and field, never a value."""

    message: int
    rule: str
    detail: str
    template: str | None = None
    type_name: str | None = None


@dataclass
class MappingResult:
    """The rows and rejects of a batch of messages."""

    rows: list[Measurement] = field(default_factory=list)
    rejects: list[MappingReject] = field(default_factory=list)
    messages: int = 0


@dataclass(frozen=True)
class Envelope:
    """The IoT Hub envelope of a message body: what the connector's templates see around ``Body``.

    System properties may use the names of IoT Hub's storage routing (``connectionDeviceId``,
    ``enqueuedTime``) or of its Event Hub endpoint (``iothub-connection-device-id``,
    ``iothub-enqueuedtime``); both are offered to the templates. ``enqueued_time`` fills
    ``iothub-enqueuedtime`` when the system properties lack it.
    """

    system_properties: Mapping[str, Any] = field(default_factory=dict)
    properties: Mapping[str, Any] = field(default_factory=dict)
    enqueued_time: datetime | str | None = None

    @classmethod
    def from_routed_record(cls, record: Mapping[str, Any]) -> Envelope:
        """The envelope of one record IoT Hub routed to storage (EnqueuedTimeUtc, Properties, ...)."""
        return cls(
            system_properties=record.get("SystemProperties") or {},
            properties=record.get("Properties") or {},
            enqueued_time=record.get("EnqueuedTimeUtc"),
        )


def event_document(body: Any, envelope: Envelope | None = None) -> dict[str, Any]:
    """The JSON document templates run over: ``{"Body", "Properties", "SystemProperties"}``."""
    envelope = envelope or Envelope()
    system = dict(envelope.system_properties)
    for routed, hub in ROUTED_SYSTEM_PROPERTIES.items():
        if routed in system and hub not in system:
            system[hub] = system[routed]
    if envelope.enqueued_time is not None and "iothub-enqueuedtime" not in system:
        enqueued = envelope.enqueued_time
        system["iothub-enqueuedtime"] = enqueued.isoformat() if isinstance(enqueued, datetime) else enqueued
    return {"Body": body, "Properties": dict(envelope.properties), "SystemProperties": system}


# --------------------------------------------------------------------------- expressions


class _ConnectorFunctions(jmespath_functions.Functions):  # type: ignore[misc]
    """The IoMT connector's JMESPath functions beyond the specification's."""

    @jmespath_functions.signature({"types": ["number"]}, {"types": ["number"]})  # type: ignore[untyped-decorator]
    def _func_add(self, left: float, right: float) -> float:
        return left + right

    @jmespath_functions.signature({"types": ["number"]}, {"types": ["number"]})  # type: ignore[untyped-decorator]
    def _func_subtract(self, left: float, right: float) -> float:
        return left - right

    @jmespath_functions.signature({"types": ["number"]}, {"types": ["number"]})  # type: ignore[untyped-decorator]
    def _func_multiply(self, left: float, right: float) -> float:
        return left * right

    @jmespath_functions.signature({"types": ["number"]}, {"types": ["number"]})  # type: ignore[untyped-decorator]
    def _func_divide(self, left: float, right: float) -> float:
        return left / right  # ZeroDivisionError rejects the message, as the connector's error does

    @jmespath_functions.signature({"types": ["number"]}, {"types": ["number"]})  # type: ignore[untyped-decorator]
    def _func_pow(self, left: float, right: float) -> float:
        result: float = math.pow(left, right)
        return result

    @jmespath_functions.signature({"types": ["string"]}, {"types": ["string"]}, {"types": ["number"]})  # type: ignore[untyped-decorator]
    def _func_insertString(self, original: str, to_insert: str, pos: float) -> str:
        index = int(pos)
        if index != pos or not 0 <= index <= len(original):
            raise ValueError("insertString position out of range")
        return original[:index] + to_insert + original[index:]

    @jmespath_functions.signature({"types": ["number"]})  # type: ignore[untyped-decorator]
    def _func_fromUnixTimestamp(self, seconds: float) -> str:
        return _from_unix(seconds)

    @jmespath_functions.signature({"types": ["number"]})  # type: ignore[untyped-decorator]
    def _func_fromUnixTimestampMs(self, milliseconds: float) -> str:
        return _from_unix(milliseconds / 1000)


def _from_unix(seconds: float) -> str:
    # ISO-8601 with +00:00 (the connector writes "+0", which is not ISO-8601).
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat()
    except (OverflowError, OSError) as exc:
        raise ValueError("Unix timestamp out of range") from exc


@functools.cache
def _jmespath_options() -> Any:
    return jmespath.Options(custom_functions=_ConnectorFunctions())


@functools.cache
def _jsonpath_env() -> jsonpath.JSONPathEnvironment:
    return jsonpath.JSONPathEnvironment()


class ExpressionFailed(Exception):
    """An expression raised while it ran over a message (e.g. a JMESPath type error)."""


@dataclass(frozen=True)
class Expression:
    """One compiled expression of a template."""

    text: str
    language: str
    where: str  # which template and field, for messages
    _evaluate: Callable[[Any, list[Any] | None], Any] = field(repr=False, compare=False)
    # A plain member path (`$.a.b-c`): its member names, looked up directly by ``value``.
    _members: tuple[str, ...] | None = field(default=None, repr=False, compare=False)

    def select(self, data: Any, containers: list[Any] | None = None) -> list[Any]:
        """Every node the expression selects (a JMESPath array result selects its items).

        ``containers`` may pass ``containers_of(data)`` when the caller has it already (one walk
        of a message serves every template's type match).
        """
        try:
            result = self._evaluate(data, containers)
        except (
            jmespath.exceptions.JMESPathError,
            jsonpath.JSONPathError,
            ArithmeticError,
            ValueError,
        ) as exc:
            raise ExpressionFailed(type(exc).__name__) from exc
        if self.language == JMESPATH_LANGUAGE:
            if result is None:
                return []
            return list(result) if isinstance(result, list) else [result]
        return list(result)

    def value(self, data: Any) -> tuple[int, Any]:
        """(how many nodes, the value if exactly one). JMESPath always yields one value or none."""
        if self._members is not None:  # most value expressions: no iterator, no list
            found = _lookup(data, self._members)
            return (0, None) if found is _NOTHING else (1, found)
        if self.language == JMESPATH_LANGUAGE:
            try:
                result = self._evaluate(data, None)
            except (jmespath.exceptions.JMESPathError, ArithmeticError, ValueError) as exc:
                raise ExpressionFailed(type(exc).__name__) from exc
            return (0, None) if result is None else (1, result)
        nodes = self.select(data)
        return (1, nodes[0]) if len(nodes) == 1 else (len(nodes), None)


def containers_of(document: Any) -> list[Any]:
    """Every object and array of ``document``, itself first, in document order (pre-order)."""
    found: list[Any] = []
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            found.append(node)
            stack.extend(child for child in reversed(node.values()) if isinstance(child, dict | list))
        elif isinstance(node, list):
            found.append(node)
            stack.extend(child for child in reversed(node) if isinstance(child, dict | list))
    return found


# `$.a.b-c['d e']`: plain member steps, looked up directly (most expressions are like this).
_MEMBER_STEP = re.compile(r"""\.([A-Za-z_][\w-]*)|\['([^'\\]*)'\]|\["([^"\\]*)"\]""")
# `@` followed by a member name, `.` or `[`: a filter that tests members, never a bare `@`.
_BARE_SELF = re.compile(r"@(?![A-Za-z_.\[])")
# The first member a filter's `@` names: `@x`, `@.x`, `@['x']`, `@["x"]`.
_SELF_MEMBER = re.compile(r"""@(?:\.?([A-Za-z_][\w-]*)|\[\s*'([^']*)'\s*\]|\[\s*"([^"]*)"\s*\])""")


def _filter_members(text: str) -> frozenset[str] | None:
    """The members a filter tests first, if every `@` in it names one; else None."""
    names = set()
    for position in (i for i, char in enumerate(text) if char == "@"):
        member = _SELF_MEMBER.match(text, position)
        if member is None:
            return None
        names.add(next(group for group in member.groups() if group is not None))
    return frozenset(names)


def _member_keys(text: str) -> tuple[str, ...] | None:
    keys: list[str] = []
    position = 1
    while position < len(text):
        step = _MEMBER_STEP.match(text, position)
        if step is None:
            return None
        keys.append(next(group for group in step.groups() if group is not None))
        position = step.end()
    return tuple(keys)


# A filter of member tests: `@a.b`, `@['a b']`, `@a == 'x'` (or a number, true, false, null),
# joined by && and || with parentheses; && binds tighter, as in python-jsonpath.
_FILTER_TOKEN = re.compile(
    r"""\s*(?:(?P<member>@(?:\.?[A-Za-z_][\w-]*|\['[^'\\]*'\])(?:\.[A-Za-z_][\w-]*|\['[^'\\]*'\])*)"""
    r"""|(?P<op>&&|\|\||==|\(|\))"""
    r"""|'(?P<single>[^'\\]*)'"""
    r'''|"(?P<double>[^"\\]*)"'''
    r"""|(?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)(?![\w.])|(?P<word>true|false|null)(?!\w))"""
)
_NOTHING = object()
Test = Callable[[dict[str, Any]], bool]


def _member_filter(text: str) -> Test | None:
    """``text`` (the inside of ``[?( )]``) as a predicate over one object, or None when it uses
    anything else (then python-jsonpath runs it). Same results as python-jsonpath (the tests
    compare both on every value shape): a member test is true when the path exists (a null
    value too); ``==`` compares the value found, a boolean only with a boolean, and an absent
    member equals nothing."""
    tokens: list[tuple[str, Any]] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _FILTER_TOKEN.match(text, position)
        if match is None:
            return None
        kind = match.lastgroup or ""
        value = (match.group(kind) or "") if kind else ""
        if kind == "member":  # `@a.b` is `@.a.b`: plain member steps after the `@`
            tokens.append(("member", _member_keys(value if value[1] in ".[" else "@." + value[1:])))
        elif kind in ("single", "double"):
            tokens.append(("literal", value))
        elif kind == "number":
            tokens.append(("literal", int(value) if value.lstrip("-").isdigit() else float(value)))
        elif kind == "word":
            tokens.append(("literal", {"true": True, "false": False, "null": None}[value]))
        else:
            tokens.append(("op", value))
        position = match.end()
    parsed, rest = _parse_joined(tokens, "||")
    return parsed if parsed is not None and not rest else None


def _lookup(node: Any, keys: tuple[str, ...]) -> Any:
    """The value at a path of member names, or ``_NOTHING`` where a member is absent."""
    value: Any = node
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return _NOTHING
        value = value[key]
    return value


def _parse_joined(tokens: list[tuple[str, Any]], operator: str) -> tuple[Test | None, list[tuple[str, Any]]]:
    """Operands joined by ``operator``: ``||`` joins ``&&`` chains, ``&&`` joins tests."""
    operand = (lambda rest: _parse_joined(rest, "&&")) if operator == "||" else _parse_test
    left, tokens = operand(tokens)
    while left is not None and tokens[:1] == [("op", operator)]:
        right, tokens = operand(tokens[1:])
        if right is None:
            return None, tokens
        left = _joined(operator, left, right)
    return left, tokens


def _joined(operator: str, left: Test, right: Test) -> Test:
    if operator == "&&":
        return lambda node: left(node) and right(node)
    return lambda node: left(node) or right(node)


def _parse_test(tokens: list[tuple[str, Any]]) -> tuple[Test | None, list[tuple[str, Any]]]:
    if tokens[:1] == [("op", "(")]:
        inner, rest = _parse_joined(tokens[1:], "||")
        if inner is None or rest[:1] != [("op", ")")]:
            return None, rest
        return inner, rest[1:]
    if not tokens or tokens[0][0] != "member":
        return None, tokens
    keys: tuple[str, ...] = tokens[0][1]
    if tokens[1:2] == [("op", "==")] and len(tokens) > 2 and tokens[2][0] == "literal":
        literal = tokens[2][1]

        def equals(node: dict[str, Any]) -> bool:
            value = _lookup(node, keys)
            if value is _NOTHING:
                return False
            if isinstance(value, bool) or isinstance(literal, bool):  # true is not 1
                return isinstance(value, bool) and isinstance(literal, bool) and value == literal
            return bool(value == literal)

        return equals, tokens[3:]
    return (lambda node: _lookup(node, keys) is not _NOTHING), tokens[1:]


def _compile_jsonpath(text: str) -> Callable[[Any, list[Any] | None], Any]:
    keys = _member_keys(text)
    if keys is not None:

        def lookup(data: Any, _containers: list[Any] | None) -> Iterator[Any]:
            value = _lookup(data, keys)
            return iter(()) if value is _NOTHING else iter((value,))

        return lookup

    if text.startswith("$..[?") and "$" not in text[1:] and not _BARE_SELF.search(text):
        # Newtonsoft's `$..[?(f)]` tests every node, the root too, in document order. Scalars never
        # pass a filter that tests members, so the filter runs over the objects and arrays only:
        # `$[?(f)]` over the list of them, which one walk of the message gives every template.
        scan = _jsonpath_env().compile("$" + text[3:])
        # Newtonsoft finds no match on a node that has none of the members the filter tests (an
        # absent member never compares equal or unequal), so only objects with one of them run it.
        members = _filter_members(text)
        # The common filters (members tested for presence or compared with a literal, joined by
        # && and ||) run as a Python predicate with python-jsonpath's results; others run in it.
        test = _member_filter(text[len("$..[?(") : -2]) if members and text.endswith(")]") else None

        def scan_filter(data: Any, containers: list[Any] | None) -> Iterator[Any]:
            candidates = containers if containers is not None else containers_of(data)
            if members:
                candidates = [c for c in candidates if isinstance(c, dict) and not members.isdisjoint(c)]
            if test is not None:
                return (c for c in candidates if test(c))
            return (match.obj for match in scan.finditer(candidates))

        return scan_filter

    # Anything else: python-jsonpath; a leading `$..[?` starts from its pseudo-root `^`, which
    # also tests the root, as Newtonsoft does.
    path = _jsonpath_env().compile("^" + text[1:] if text.startswith("$..[?") else text)

    def evaluate(data: Any, _containers: list[Any] | None) -> Iterator[Any]:
        if isinstance(data, str):
            # python-jsonpath would parse a str as a JSON document; a string token has no members.
            return iter([data] if text == "$" else [])
        return (match.obj for match in path.finditer(data))

    return evaluate


def _jmespath_function_names(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if node.get("type") == "function_expression":
            yield str(node.get("value"))
        for child in node.get("children", ()):
            yield from _jmespath_function_names(child)


def _compile_jmespath(text: str) -> Callable[[Any, list[Any] | None], Any]:
    parsed = jmespath.compile(text)
    known = set(_ConnectorFunctions.FUNCTION_TABLE)
    for name in _jmespath_function_names(parsed.parsed):
        if name not in known:
            raise ValueError(f"unknown JMESPath function {name}(); known: {', '.join(sorted(known))}")
    options = _jmespath_options()

    def evaluate(data: Any, _containers: list[Any] | None) -> Any:
        return parsed.search(data, options=options)

    return evaluate


def compile_expression(text: str, language: str, field_name: str) -> Expression:
    """Compile one expression; raises ValueError with a one-line reason if it is invalid."""
    text = text.strip()
    if language == JSONPATH_LANGUAGE:
        if not text.startswith("$"):
            raise ValueError(
                f"JSONPath expression {text!r} must start with '$' "
                '(for JMESPath write {"value": ..., "language": "JmesPath"} in a CalculatedContent template)'
            )
        try:
            return Expression(text, language, field_name, _compile_jsonpath(text), _member_keys(text))
        except jsonpath.JSONPathError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"bad JSONPath {text!r}: {first}") from exc
    try:
        return Expression(text, language, field_name, _compile_jmespath(text))
    except jmespath.exceptions.JMESPathError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"bad JMESPath {text!r}: {first}") from exc


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class ValueSpec:
    name: str
    expression: Expression
    required: bool


@dataclass(frozen=True)
class DeviceTemplate:
    """One compiled content template (one entry of a template file's collection)."""

    file: str  # the file's name, as rows name it
    index: int  # position in the file's collection (0 for a file holding one template)
    kind: str
    type_name: str
    type_match: Expression
    device_id: Expression
    timestamps: tuple[Expression, ...]  # tried in order; the first that gives a time wins
    values: tuple[ValueSpec, ...]
    case_id: Expression | None = None
    correlation_id: Expression | None = None
    patient_id: Expression | None = None
    encounter_id: Expression | None = None

    @property
    def label(self) -> str:
        return f"{self.file} template {self.index} ({self.type_name})"


class _Invalid(Exception):
    """One problem with one template; collected, then raised as one ConfigurationError."""


def _bool(raw: Any, where: str) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    raise _Invalid(f"{where}: 'required' must be true or false")


def _at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


def _unknown_keys(obj: Mapping[str, Any], allowed: Sequence[str]) -> list[str]:
    problems = []
    for key in obj:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            problems.append(f"unknown field '{key}' ({hint})")
    return problems


def _check_keys(obj: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    problems = _unknown_keys(obj, allowed)
    if problems:
        raise _Invalid(_at(where, "; ".join(problems)))


class _TemplateParser:
    """Turns one file's JSON into compiled templates, collecting every problem it finds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []

    def problem(self, message: str) -> None:
        self.problems.append(f"{self.path}: {message}")

    def parse_file(self) -> list[DeviceTemplate]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8-sig"))
        except OSError as exc:
            self.problem(f"cannot be read ({type(exc).__name__})")
            return []
        except json.JSONDecodeError as exc:
            self.problem(f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
            return []
        except UnicodeDecodeError:
            self.problem("is not UTF-8 text")
            return []
        if not isinstance(data, dict):
            self.problem('must hold a JSON object {"templateType": ..., "template": ...}')
            return []
        kind = self._kind(data, "")
        if kind is None:
            return []
        if kind != COLLECTION:
            template = self._content(data, kind, 0, "template")
            return [template] if template else []
        for unknown in _unknown_keys(data, ("templateType", "template")):
            self.problem(unknown)
        items = data.get("template")
        if not isinstance(items, list):
            self.problem(f"'template' of a {COLLECTION} template must be an array of templates")
            return []
        templates = []
        for index, item in enumerate(items):
            where = f"template {index}"
            if not isinstance(item, dict):
                self.problem(f'{where}: must be an object {{"templateType": ..., "template": ...}}')
                continue
            item_kind = self._kind(item, where)
            if item_kind == COLLECTION:
                self.problem(f"{where}: a {COLLECTION} template cannot be nested in another")
            elif item_kind is not None:
                template = self._content(item, item_kind, index, where)
                if template:
                    templates.append(template)
        return templates

    def _kind(self, container: Mapping[str, Any], where: str) -> str | None:
        raw = container.get("templateType")
        if not isinstance(raw, str) or not raw.strip():
            kinds = ", ".join(_KINDS.values())
            self.problem(_at(where, f"'templateType' is missing or empty; use one of {kinds}"))
            return None
        key = raw.strip().lower()
        key = key.removesuffix("template") if key not in _KINDS else key
        if key in _FHIR_KINDS:
            self.problem(
                _at(
                    where,
                    f"templateType '{raw}' is an IoMT FHIR mapping template ({_FHIR_KINDS[key]}); "
                    "patient-journey reads device content templates only, so keep FHIR mapping files "
                    "out of the device template folder",
                )
            )
            return None
        if key not in _KINDS:
            kinds = ", ".join(_KINDS.values())
            self.problem(_at(where, f"unknown templateType '{raw}'; use one of {kinds}"))
            return None
        return _KINDS[key]

    def _content(
        self, container: Mapping[str, Any], kind: str, index: int, where: str
    ) -> DeviceTemplate | None:
        body = container.get("template")
        type_name = body.get("typeName") if isinstance(body, dict) else None
        if isinstance(type_name, str) and type_name.strip():
            where = f"{where} ({type_name})"
        try:
            _check_keys(container, ("templateType", "template"), where)
            if not isinstance(body, dict):
                raise _Invalid(f"{where}: 'template' of a {kind} template must be an object")
            return self._build(body, kind, index, where)
        except _Invalid as exc:
            self.problem(str(exc))
            return None

    def _build(self, body: Mapping[str, Any], kind: str, index: int, where: str) -> DeviceTemplate:
        required = _FIELDS_BY_KIND[kind]
        allowed = (*required, *_OPTIONAL_IDS)
        if kind == CALCULATED:
            allowed = (*allowed, "defaultExpressionLanguage")
        problems = []
        if kind in (IOT, IOT_CENTRAL):
            for fixed in ("deviceIdExpression", "timestampExpression"):
                if fixed in body:
                    problems.append(
                        f"{kind} sets '{fixed}' itself; remove it, or use {JSONPATH} or {CALCULATED} "
                        "to choose the expression"
                    )
                    allowed = (*allowed, fixed)
        problems.extend(_unknown_keys(body, allowed))
        missing = [name for name in required if body.get(name) in (None, "")]
        if missing:
            problems.append(
                f"missing required field{'s' if len(missing) > 1 else ''} "
                f"{', '.join(repr(m) for m in missing)} ({kind} templates need {', '.join(required)})"
            )
        if problems:
            raise _Invalid(_at(where, "; ".join(problems)))
        type_name = body["typeName"]
        if not isinstance(type_name, str) or not type_name.strip():
            raise _Invalid(f"{where}: 'typeName' must be a non-empty string")
        default = JSONPATH_LANGUAGE
        if kind == CALCULATED and "defaultExpressionLanguage" in body:
            default = self._language(body["defaultExpressionLanguage"], f"{where}: defaultExpressionLanguage")

        def expression(name: str, raw: Any) -> Expression:
            return self._expression(raw, kind, default, f"{where}: {name}")

        if kind == IOT:
            device_id = expression("deviceIdExpression", IOT_DEVICE_ID)
            timestamps = tuple(expression("timestampExpression", t) for t in IOT_TIMESTAMPS)
        elif kind == IOT_CENTRAL:
            device_id = expression("deviceIdExpression", IOT_CENTRAL_DEVICE_ID)
            timestamps = (expression("timestampExpression", IOT_CENTRAL_TIMESTAMP),)
        else:
            device_id = expression("deviceIdExpression", body["deviceIdExpression"])
            timestamps = (expression("timestampExpression", body["timestampExpression"]),)
        optional = {
            name: expression(name, body[name]) if body.get(name) not in (None, "") else None
            for name in _OPTIONAL_IDS
        }
        return DeviceTemplate(
            file=self.path.name,
            index=index,
            kind=kind,
            type_name=type_name.strip(),
            type_match=expression("typeMatchExpression", body["typeMatchExpression"]),
            device_id=device_id,
            timestamps=timestamps,
            values=self._values(body["values"], kind, default, where),
            case_id=optional["caseIdExpression"],
            correlation_id=optional["correlationIdExpression"],
            patient_id=optional["patientIdExpression"],
            encounter_id=optional["encounterIdExpression"],
        )

    def _values(self, raw: Any, kind: str, default: str, where: str) -> tuple[ValueSpec, ...]:
        if not isinstance(raw, list) or not raw:
            raise _Invalid(
                f'{where}: \'values\' must be a non-empty array of {{"valueName", "valueExpression"}}'
            )
        specs: list[ValueSpec] = []
        for i, item in enumerate(raw):
            at = f"{where}: values[{i}]"
            if not isinstance(item, dict):
                raise _Invalid(f"{at}: must be an object")
            _check_keys(item, _VALUE_FIELDS, at)
            name = item.get("valueName")
            if not isinstance(name, str) or not name.strip():
                raise _Invalid(f"{at}: missing required field 'valueName'")
            at = f"{where}: value '{name}'"
            if item.get("valueExpression") in (None, ""):
                raise _Invalid(f"{at}: missing required field 'valueExpression'")
            if name in {s.name for s in specs}:
                raise _Invalid(f"{at}: valueName appears twice")
            specs.append(
                ValueSpec(
                    name=name.strip(),
                    expression=self._expression(item["valueExpression"], kind, default, at),
                    required=_bool(item.get("required", False), at),
                )
            )
        return tuple(specs)

    def _language(self, raw: Any, where: str) -> str:
        language = _LANGUAGES.get(str(raw).strip().lower()) if isinstance(raw, str) else None
        if language is None:
            raise _Invalid(f"{where}: unsupported expression language {raw!r}; use JsonPath or JmesPath")
        return language

    def _expression(self, raw: Any, kind: str, default: str, where: str) -> Expression:
        language = default
        if isinstance(raw, dict):
            if kind != CALCULATED:
                raise _Invalid(
                    f'{where}: {kind} takes a JSONPath string; {{"value", "language"}} expressions '
                    f"need a {CALCULATED} template"
                )
            _check_keys(raw, ("value", "language"), where)
            if "language" in raw:
                language = self._language(raw["language"], where)
            raw = raw.get("value")
        if not isinstance(raw, str) or not raw.strip():
            raise _Invalid(f"{where}: the expression must be a non-empty string")
        try:
            return compile_expression(raw, language, where)
        except ValueError as exc:
            raise _Invalid(f"{where}: {exc}") from exc


def _raise(problems: list[str]) -> None:
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise ConfigurationError(
            f"device templates do not load ({len(problems)} problem{'s' if len(problems) > 1 else ''}); "
            f"fix the file(s) named below (format: catalog/devices/README.md):\n{listed}"
        )


def load_template_files(paths: Iterable[str | Path]) -> DeviceTemplates:
    """Load and compile the given template files; every problem in any file raises, at once."""
    templates: list[DeviceTemplate] = []
    problems: list[str] = []
    files: list[str] = []
    for raw in paths:
        parser = _TemplateParser(Path(raw))
        templates.extend(parser.parse_file())
        problems.extend(parser.problems)
        files.append(Path(raw).name)
    _raise(problems)
    return DeviceTemplates(tuple(templates), tuple(files))


def load_templates(folder: str | Path) -> DeviceTemplates:
    """Load every ``*.json`` template file directly in ``folder`` (sorted by name)."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigurationError(
            f"device template folder {path} does not exist; point it at a folder of template files "
            "such as the repository's catalog/devices"
        )
    files = sorted(p for p in path.glob("*.json") if p.is_file())
    if not files:
        raise ConfigurationError(
            f"device template folder {path} has no *.json template files; add one per device type "
            "(see catalog/devices/README.md)"
        )
    return load_template_files(files)


# --------------------------------------------------------------------------- mapping


def _identifier(value: Any) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _utc(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    else:
        return None
    # A time without an offset is taken as UTC, as the connector's OccurrenceTimeUtc does.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _present(value: Any) -> bool:
    """The connector's rule: present when not null, and a string must not be blank."""
    return value is not None and not (isinstance(value, str) and not value.strip())


class _Rejected(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class DeviceTemplates:
    """A loaded set of templates. Map messages with :meth:`map_message` or :meth:`map_messages`."""

    templates: tuple[DeviceTemplate, ...]
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.templates)

    def type_names(self) -> list[str]:
        return sorted({t.type_name for t in self.templates})

    def value_names(self, type_name: str) -> list[str]:
        """Every value name the templates of ``type_name`` give, in template order."""
        names: dict[str, None] = {}
        for template in self.templates:
            if template.type_name == type_name:
                names.update((spec.name, None) for spec in template.values)
        return list(names)

    def map_messages(self, messages: Iterable[tuple[Any, Envelope | None]]) -> MappingResult:
        """Map (body, envelope) pairs; ``message`` in rows and rejects is the pair's index."""
        result = MappingResult()
        for index, (body, envelope) in enumerate(messages):
            self._map_into(result, body, envelope, index)
        return result

    def map_message(self, body: Any, envelope: Envelope | None = None, *, message: int = 0) -> MappingResult:
        """Map one message body (parsed JSON) with its IoT Hub envelope."""
        result = MappingResult()
        self._map_into(result, body, envelope, message)
        return result

    def map_event(self, event: Mapping[str, Any], *, message: int = 0) -> MappingResult:
        """Map a document already in the connector's event shape (``Body``, ``Properties``,
        ``SystemProperties``), or any JSON object the templates should see as it is."""
        result = MappingResult()
        self._map_document(result, dict(event), message)
        return result

    def _map_into(self, result: MappingResult, body: Any, envelope: Envelope | None, message: int) -> None:
        self._map_document(result, event_document(body, envelope), message)

    def _map_document(self, result: MappingResult, document: dict[str, Any], message: int) -> None:
        result.messages += 1
        rows: list[Measurement] = []
        rejects: list[MappingReject] = []
        matched = False
        containers = containers_of(document)
        matches = 0
        for template in self.templates:
            try:
                tokens = template.type_match.select(document, containers)
            except ExpressionFailed:
                # A type match that cannot run on this message does not match it: one faulty
                # template must not reject other device types' messages (its own ones then show
                # up as unmatched).
                continue
            for token in tokens:
                matched = True
                scope = {**document, MATCH_PROPERTY: token} if template.kind == CALCULATED else token
                try:
                    rows.extend(self._measure(template, scope, message, matches))
                    matches += 1
                except _Rejected as exc:
                    rejects.append(self._reject(message, template, exc.detail))
        if not matched:
            result.rejects.append(
                MappingReject(
                    message,
                    RULE_NO_TEMPLATE,
                    f"no device template matched the message ({len(self.templates)} templates "
                    f"from {len(self.files)} files tried); add a template file for its device type",
                )
            )
        elif rejects:
            result.rejects.extend(rejects)  # atomic: a message with any reject loads no rows
        else:
            result.rows.extend(rows)

    @staticmethod
    def _reject(message: int, template: DeviceTemplate, detail: str) -> MappingReject:
        return MappingReject(
            message, RULE_REQUIRED_VALUE, f"{template.label}: {detail}", template.file, template.type_name
        )

    @staticmethod
    def _one(expression: Expression, scope: Any, name: str) -> Any:
        try:
            count, value = expression.value(scope)
        except ExpressionFailed as exc:
            raise _Rejected(f"{name} expression {expression.text} failed ({exc})") from exc
        if count > 1:
            raise _Rejected(f"{name} expression {expression.text} selected {count} values; expected one")
        return value

    def _identifier_of(
        self, expression: Expression | None, scope: Any, name: str, required: bool
    ) -> str | None:
        if expression is None:
            return None
        raw = self._one(expression, scope, name)
        value = _identifier(raw)
        if value is None and required:
            what = "did not give a string or number" if _present(raw) else "found no value"
            raise _Rejected(f"required {name} missing: {expression.text} {what}")
        return value

    def _measure(self, template: DeviceTemplate, scope: Any, message: int, match: int) -> list[Measurement]:
        device_id = self._identifier_of(template.device_id, scope, "device id", required=True)
        measured_at = None
        for expression in template.timestamps:
            measured_at = _utc(self._one(expression, scope, "timestamp"))
            if measured_at is not None:
                break
        if measured_at is None:
            tried = ", ".join(e.text for e in template.timestamps)
            raise _Rejected(f"required timestamp missing: {tried} gave no ISO-8601 time")
        case_id = self._identifier_of(template.case_id, scope, "case id", required=True)
        correlation_id = self._identifier_of(template.correlation_id, scope, "correlation id", required=True)
        patient_id = self._identifier_of(template.patient_id, scope, "patient id", required=False)
        encounter_id = self._identifier_of(template.encounter_id, scope, "encounter id", required=False)
        assert device_id is not None  # required=True above
        rows = []
        for spec in template.values:
            value = self._one(spec.expression, scope, f"value '{spec.name}'")
            if isinstance(value, dict | list):
                # present but not one value, required or not: a rule, never a value silently dropped
                raise _Rejected(f"value '{spec.name}': {spec.expression.text} is not a single value")
            if not _present(value):
                if spec.required:
                    raise _Rejected(
                        f"required value '{spec.name}' missing: {spec.expression.text} found no value"
                    )
                continue
            rows.append(
                Measurement(
                    message=message,
                    match=match,
                    type_name=template.type_name,
                    template=template.file,
                    device_id=device_id,
                    case_id=case_id,
                    correlation_id=correlation_id,
                    patient_id=patient_id,
                    encounter_id=encounter_id,
                    measured_at=measured_at,
                    value_name=spec.name,
                    value=value,
                )
            )
        return rows
