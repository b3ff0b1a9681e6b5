"""Parameter validation as Proxmox's JSONSchema module does it, driven by the schema's parameter definitions.

Values arrive as form strings (or JSON values): booleans must be "1"/"0" (Proxmox rejects "true"),
integers plain digits. The result is the parameters converted to Python types, or Proxmox's per-parameter
error reasons.
"""

from __future__ import annotations

import re
from typing import Any

from .formats import PARAMETER_FORMAT_OVERLAY, PROPERTY_STRING_FORMATS, SIMPLE_FORMATS, FormatError, parse_property_string
from .schema import property_schema

UNKNOWN_PROPERTY = "property is not defined in schema and the schema does not allow additional properties"
MISSING_PROPERTY = "property is missing and it is not optional"
_INTEGER = re.compile(r"^[+-]?\d+$")
_PROPERTY_BOOLEANS = {"1": "1", "true": "1", "yes": "1", "on": "1", "0": "0", "false": "0", "no": "0", "off": "0"}
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


class ParameterErrors(Exception):
    """Proxmox answers these with HTTP 400 and `{"errors": {param: reason}}`."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("Parameter verification failed.")
        self.errors = errors


def _perl_regex(pattern: str) -> str:
    # Proxmox exports Perl patterns; `(?^:...)` is Perl's "default flags" group.
    return pattern.replace("(?^:", "(?:")


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _bound(schema: dict, key: str) -> float | None:
    # Some upstream bounds are strings ("0"); compare them as numbers.
    bound = schema.get(key)
    return None if bound is None else float(bound)


def check_value(value: Any, schema: dict, name: str) -> tuple[Any, str | None]:
    """Convert and check one value; returns (converted value, None) or (None, reason)."""
    kind = schema.get("type", "string")
    if kind == "array":
        # Each item is checked as a string of the array's format (the subset keeps no `items` for parameters).
        item_schema = {"type": "string", **({"format": schema["format"]} if "format" in schema else {})}
        items = []
        for item in value if isinstance(value, list) else [value]:
            converted_item, reason = check_value(item, item_schema, name)
            if reason:
                return None, reason
            items.append(converted_item)
        return items, None
    text = _as_text(value)
    if kind == "boolean":
        if text not in ("0", "1"):
            return None, f"type check ('boolean') failed - got '{text}'"
        converted: Any = text == "1"
    elif kind == "integer":
        if not _INTEGER.match(text):
            return None, f"type check ('integer') failed - got '{text}'"
        converted = int(text)
    elif kind == "number":
        if not _NUMBER.match(text):
            return None, f"type check ('number') failed - got '{text}'"
        converted = float(text)
    else:
        converted = text
    reason = _check_constraints(converted, text, schema, name)
    return (None, reason) if reason else (converted, None)


def _check_constraints(converted: Any, text: str, schema: dict, name: str) -> str | None:
    enum = schema.get("enum")
    if enum is not None and text not in [str(item) for item in enum]:
        return f"value '{text}' does not have a value in the enumeration '{', '.join(str(item) for item in enum)}'"
    minimum, maximum = _bound(schema, "minimum"), _bound(schema, "maximum")
    if minimum is not None and converted < minimum:
        return f"value must have a minimum value of {schema['minimum']}"
    if maximum is not None and converted > maximum:
        return f"value must have a maximum value of {schema['maximum']}"
    if "maxLength" in schema and len(text) > int(schema["maxLength"]):
        return f"value may only be {schema['maxLength']} characters long"
    if "minLength" in schema and len(text) < int(schema["minLength"]):
        return f"value must be at least {schema['minLength']} characters long"
    pattern = schema.get("pattern")
    if pattern is not None and not re.fullmatch(_perl_regex(pattern), text):
        return "value does not match the regex pattern"
    format_name = schema.get("format")
    if isinstance(format_name, str):
        return _check_format(text, format_name, name)
    return None


def _check_format(text: str, format_name: str, name: str) -> str | None:
    properties = PROPERTY_STRING_FORMATS.get(format_name)
    if properties is not None:
        return _check_property_string(text, properties, name)
    check = SIMPLE_FORMATS.get(format_name)
    if check is None:
        return None
    try:
        check(text)
    except FormatError as error:
        return f"invalid format - {error}"
    return None


def _check_property_string(text: str, properties: dict, name: str) -> str | None:
    """Each key of `a=1,b=2` is checked against its own schema, the same way parameters are."""
    try:
        parsed = parse_property_string(text, properties)
    except FormatError as error:
        return f"invalid format - {error}"
    problems = []
    for key, item in parsed.items():
        key_schema = properties.get(key)
        if key_schema is None:
            problems.append(f"{name}.{key}: {UNKNOWN_PROPERTY}")
            continue
        if key_schema.get("type") == "boolean":
            # Inside property strings Proxmox reads yes/no, on/off, true/false as booleans too.
            item = _PROPERTY_BOOLEANS.get(item.lower(), item)
        _converted, reason = check_value(item, key_schema, f"{name}.{key}")
        if reason:
            problems.append(f"{name}.{key}: {reason}")
    problems.extend(f"{name}.{key}: {MISSING_PROPERTY}" for key, schema in properties.items() if not schema.get("optional") and key not in parsed)
    if problems:
        return "invalid format - format error\n" + "\n".join(problems)
    return None


def validate(params: dict[str, Any], parameters: dict) -> dict[str, Any]:
    """Check `params` against a route's parameter schema; return them converted or raise ParameterErrors."""
    errors: dict[str, str] = {}
    converted: dict[str, Any] = {}
    for name, value in params.items():
        schema = property_schema(parameters, name)
        if schema is None:
            errors[name] = UNKNOWN_PROPERTY
            continue
        schema_name = name if name in parameters else re.sub(r"\d+$", "[n]", name)
        overlay = PARAMETER_FORMAT_OVERLAY.get(schema_name)
        if overlay and "format" not in schema:
            schema = {**schema, "format": overlay}
        result, reason = check_value(value, schema, name)
        if reason:
            errors[name] = reason
        else:
            converted[name] = result
    for name, schema in parameters.items():
        if not schema.get("optional") and name not in params and not name.endswith("[n]"):
            errors[name] = MISSING_PROPERTY
    if errors:
        raise ParameterErrors(errors)
    return converted


def check_returns(value: Any, schema: dict, where: str = "data") -> list[str]:
    """Where `value` disagrees with a `returns` schema, both ways: undeclared or mistyped fields, missing required ones.

    Objects that declare properties are closed; booleans may be 0/1, as Proxmox encodes them.
    """
    kind = schema.get("type")
    if value is None:
        return [] if kind in (None, "null") or schema.get("optional") else [f"{where}: null where {kind} is declared"]
    type_ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool) or value in (0, 1),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
        "null": False,
    }.get(kind, True)
    if not type_ok:
        return [f"{where}: {value!r} is not of type {kind}"]
    problems: list[str] = []
    if "enum" in schema and str(value) not in [str(item) for item in schema["enum"]]:
        problems.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if kind == "array" and "items" in schema:
        for index, item in enumerate(value):
            problems.extend(check_returns(item, schema["items"], f"{where}[{index}]"))
    if kind == "object" and schema.get("properties"):
        properties = schema["properties"]
        for key, item in value.items():
            item_schema = property_schema(properties, key)
            if item_schema is None:
                problems.append(f"{where}.{key}: not declared in the schema")
            else:
                problems.extend(check_returns(item, item_schema, f"{where}.{key}"))
        problems.extend(
            f"{where}.{key}: declared as required but missing"
            for key, item_schema in properties.items()
            if not item_schema.get("optional") and not key.endswith("[n]") and key not in value
        )
    return problems
