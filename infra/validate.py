"""Offline checks of the Bicep files in infra/, for machines without the Bicep CLI.

The Bicep compiler (`az bicep build`, `bicep lint`) is a .NET binary that its installers download
from Microsoft's servers; where it is available, prefer it (see infra/README.md). This script is
the fallback: two independent Bicep grammars for syntax, the Azure SDK models of the exact API
versions used for property names and enum values, and cross-checks of modules, parameters and the
example parameter file. It does not evaluate expressions, so it cannot catch every type error.

    python -m venv /tmp/bicep-check
    /tmp/bicep-check/bin/pip install pycep-parser==0.7.1 tree-sitter==0.26.1 tree-sitter-bicep==1.1.0 \
        azure-mgmt-storage==21.2.1 azure-mgmt-authorization==4.0.0
    /tmp/bicep-check/bin/python infra/validate.py

Exit status 0 when every check passes; otherwise every problem is printed, one per line.
"""

from __future__ import annotations

import json
import re
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import tree_sitter_bicep
from azure.mgmt.authorization.v2022_04_01 import models as auth_models
from azure.mgmt.storage.v2023_05_01 import models as storage_models
from pycep import BicepParser
from tree_sitter import Language, Node, Parser

INFRA = Path(__file__).resolve().parent
MAIN = INFRA / "main.bicep"
EXAMPLE_PARAMETERS = INFRA / "main.parameters.example.json"

# Resource type and API version -> the SDK model of the request body for that version.
BODY_MODELS: dict[tuple[str, str], type] = {
    ("Microsoft.Storage/storageAccounts", "2023-05-01"): storage_models.StorageAccountCreateParameters,
    ("Microsoft.Storage/storageAccounts/blobServices", "2023-05-01"): storage_models.BlobServiceProperties,
    ("Microsoft.Storage/storageAccounts/blobServices/containers", "2023-05-01"): storage_models.BlobContainer,
    ("Microsoft.Storage/storageAccounts/managementPolicies", "2023-05-01"): storage_models.ManagementPolicy,
    ("Microsoft.Authorization/roleAssignments", "2022-04-01"): auth_models.RoleAssignmentCreateParameters,
}
MODEL_MODULES = (storage_models, auth_models)
# Keys of a Bicep resource body that are not part of the REST request body.
ENVELOPE = {"name", "parent", "scope", "dependsOn"}

# (model, attribute) -> the enum whose values a literal there must be one of.
ENUMS: dict[tuple[str, str], type[Enum]] = {
    ("StorageAccountCreateParameters", "kind"): storage_models.Kind,
    ("StorageAccountCreateParameters", "access_tier"): storage_models.AccessTier,
    ("StorageAccountCreateParameters", "minimum_tls_version"): storage_models.MinimumTlsVersion,
    ("StorageAccountCreateParameters", "public_network_access"): storage_models.PublicNetworkAccess,
    ("Sku", "name"): storage_models.SkuName,
    ("NetworkRuleSet", "default_action"): storage_models.DefaultAction,
    ("NetworkRuleSet", "bypass"): storage_models.Bypass,
    ("Encryption", "key_source"): storage_models.KeySource,
    ("EncryptionService", "key_type"): storage_models.KeyType,
    ("BlobContainer", "public_access"): storage_models.PublicAccess,
    ("ManagementPolicyRule", "type"): storage_models.RuleType,
    ("RoleAssignmentCreateParameters", "principal_type"): auth_models.PrincipalType,
}
# Parameters whose @allowed values must be values of an SDK enum.
PARAMETER_ENUMS: dict[str, type[Enum]] = {
    "skuName": storage_models.SkuName,
    "publicNetworkAccess": storage_models.PublicNetworkAccess,
    "networkDefaultAction": storage_models.DefaultAction,
    "pipelinePrincipalType": auth_models.PrincipalType,
    "analystsPrincipalType": auth_models.PrincipalType,
    "principalType": auth_models.PrincipalType,
}

problems: list[str] = []


def problem(message: str) -> None:
    problems.append(message)


def enum_values(enum: type[Enum]) -> set[str]:
    return {str(member.value).lower() for member in enum}


# --- syntax -------------------------------------------------------------------------------------


def tree_sitter_errors(path: Path) -> list[str]:
    parser = Parser(Language(tree_sitter_bicep.language()))
    tree = parser.parse(path.read_bytes())
    found: list[str] = []

    def walk(node: Node) -> None:
        if node.type == "ERROR" or node.is_missing:
            row, column = node.start_point
            found.append(f"{path.name}:{row + 1}:{column + 1}: tree-sitter-bicep cannot parse here")
        for child in node.children:
            walk(child)

    walk(tree.root_node)
    return found


def parse(path: Path) -> dict[str, Any] | None:
    for message in tree_sitter_errors(path):
        problem(message)
    try:
        return BicepParser(add_line_numbers=True).parse(file_path=path)
    except Exception as exc:  # lark raises several error types
        problem(f"{path.name}: pycep cannot parse it: {str(exc).splitlines()[0]}")
        return None


# --- resource bodies against the SDK models -------------------------------------------------------


def schema_of(model: type) -> dict[str, Any]:
    """The model's REST body as a tree: JSON key -> (attribute name, type string) or subtree."""
    tree: dict[str, Any] = {}
    for attribute, spec in model._attribute_map.items():  # type: ignore[attr-defined]
        parts = [p.replace("\\.", ".") for p in re.split(r"(?<!\\)\.", spec["key"])]
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = (attribute, spec["type"])
    return tree


def model_named(name: str) -> type | None:
    for module in MODEL_MODULES:
        found = getattr(module, name, None)
        if isinstance(found, type):
            return found
    return None


def unwrap(value: Any, variables: dict[str, Any]) -> list[Any]:
    """The literal shapes a Bicep value can take: loops, conditions and variables are opened.

    pycep writes a reference to a parameter, variable or resource as a bare string, like a
    literal; names in ``variables`` (which also lists parameters and symbols) are therefore
    resolved or skipped. Parameters are checked on their own (@allowed, PARAMETER_ENUMS).
    """
    if isinstance(value, str) and value in variables:
        resolved = variables[value]
        return (
            unwrap(resolved["value"], variables) if isinstance(resolved, dict) and "value" in resolved else []
        )
    if isinstance(value, dict) and "loop_type" in value and "config" in value:
        return unwrap(value["config"], variables)
    if isinstance(value, dict) and set(value) == {"operator"}:
        operator = value["operator"]
        if operator.get("type") == "conditional":
            operands = operator["operands"]
            return unwrap(operands["true_value"], variables) + unwrap(operands["false_value"], variables)
        return []  # any other expression: its value is not known here
    if isinstance(value, dict) and set(value) == {"function"}:
        function = value["function"]
        if function.get("type") == "concat":  # arrays: every argument's items, as one array
            items: list[Any] = []
            for argument in function["parameters"].values():
                for shape in unwrap(argument, variables):
                    items.extend(shape if isinstance(shape, list) else [])
            return [items]
        return []  # any other function call
    return [value]


def check_value(
    where: str, model_name: str, attribute: str, type_name: str, value: Any, variables: dict[str, Any]
) -> None:
    for shape in unwrap(value, variables):
        if type_name.startswith("[") and type_name.endswith("]"):
            if isinstance(shape, list):
                for item in shape:
                    check_value(where, model_name, attribute, type_name[1:-1], item, variables)
            continue
        if isinstance(shape, dict):
            nested = model_named(type_name)
            if nested is not None:
                check_body(where, nested, shape, variables)
            elif not type_name.startswith("{"):
                problem(f"{where}: an object where {model_name}.{attribute} expects {type_name}")
            continue
        enum = ENUMS.get((model_name, attribute))
        if enum is not None and isinstance(shape, str) and "${" not in shape:
            allowed = enum_values(enum)
            words = (
                [w.strip().lower() for w in shape.split(",")]
                if enum is storage_models.Bypass
                else [shape.lower()]
            )
            for word in words:
                if word not in allowed:
                    problem(f"{where}: {word!r} is not a value of {enum.__name__} ({sorted(allowed)})")


def check_body(
    where: str, model: type, body: dict[str, Any], variables: dict[str, Any], top: bool = False
) -> None:
    check_tree(where, model.__name__, schema_of(model), body, variables, top)


def check_tree(
    where: str,
    model_name: str,
    schema: dict[str, Any],
    body: dict[str, Any],
    variables: dict[str, Any],
    top: bool,
) -> None:
    for key, value in body.items():
        if top and key in ENVELOPE:
            continue
        if key not in schema:
            problem(f"{where}: {model_name} has no property {key!r} (known: {sorted(schema)})")
            continue
        entry = schema[key]
        if isinstance(entry, dict):  # a flattened level such as "properties"
            for shape in unwrap(value, variables):
                if isinstance(shape, dict):
                    check_tree(f"{where}.{key}", model_name, entry, shape, variables, False)
            continue
        attribute, type_name = entry
        check_value(f"{where}.{key}", model_name, attribute, type_name, value, variables)


def symbols(tree: dict[str, Any]) -> dict[str, Any]:
    """Variables by name, plus parameters and resource and module symbols (values unknown)."""
    known: dict[str, Any] = dict.fromkeys(tree.get("parameters", {}), None)
    known.update(dict.fromkeys(tree.get("resources", {}), None))
    known.update(dict.fromkeys(tree.get("modules", {}), None))
    known.update(tree.get("variables", {}))
    return known


def check_resources(path: Path, tree: dict[str, Any]) -> None:
    variables = symbols(tree)
    for symbol, resource in tree.get("resources", {}).items():
        where = f"{path.name}:{resource.get('__start_line__', '?')} resource {symbol}"
        key = (resource["type"], resource["api_version"])
        model = BODY_MODELS.get(key)
        if model is None:
            problem(f"{where}: no SDK model registered for {key[0]}@{key[1]}")
            continue
        body = resource["config"]
        while isinstance(body, dict) and "config" in body and ("condition" in body or "loop_type" in body):
            body = body["config"]
        if resource.get("existing"):
            continue
        check_body(where, model, body, variables, top=True)


# --- modules, parameters, outputs -------------------------------------------------------------------


def declared_parameters(tree: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(tree.get("parameters", {}))


def allowed_values(parameter: dict[str, Any]) -> list[Any] | None:
    for decorator in parameter.get("decorators", []):
        if decorator.get("type") == "allowed":
            return list(decorator["argument"])
    return None


def check_parameters(path: Path, tree: dict[str, Any]) -> None:
    text = path.read_text()
    for name, parameter in declared_parameters(tree).items():
        if len(re.findall(rf"\b{re.escape(name)}\b", text)) < 2:
            problem(f"{path.name}: parameter {name} is never used")
        allowed = allowed_values(parameter)
        default = parameter.get("default")
        if (
            allowed is not None
            and default is not None
            and not isinstance(default, dict)
            and default not in allowed
        ):
            problem(f"{path.name}: parameter {name} defaults to {default!r}, not one of its @allowed values")
        enum = PARAMETER_ENUMS.get(name)
        if enum is not None and allowed is not None:
            for value in allowed:
                if str(value).lower() not in enum_values(enum):
                    problem(
                        f"{path.name}: @allowed value {value!r} of {name} is not a value of {enum.__name__}"
                    )
    for name in tree.get("variables", {}):
        if len(re.findall(rf"\b{re.escape(name)}\b", text)) < 2:
            problem(f"{path.name}: variable {name} is never used")


def check_modules(path: Path, tree: dict[str, Any], parsed: dict[Path, dict[str, Any]]) -> None:
    for symbol, module in tree.get("modules", {}).items():
        target = (path.parent / module["detail"]["path"]).resolve()
        where = f"{path.name}:{module.get('__start_line__', '?')} module {symbol}"
        if target not in parsed:
            problem(f"{where}: {module['detail']['path']} is not a parsed Bicep file")
            continue
        body = module["config"]
        while isinstance(body, dict) and "config" in body and ("condition" in body or "loop_type" in body):
            body = body["config"]
        declared = declared_parameters(parsed[target])
        passed = body.get("params", {})
        for name in passed:
            if name not in declared:
                problem(f"{where}: passes {name}, which {target.name} does not declare")
        for name, parameter in declared.items():
            if parameter.get("default") is None and name not in passed:
                problem(f"{where}: does not pass the required parameter {name}")
        references = symbols(tree)
        for name, value in passed.items():
            allowed = allowed_values(declared.get(name, {}))
            literal = isinstance(value, str) and value not in references and "${" not in value
            if allowed is not None and literal and value not in allowed:
                problem(f"{where}: {name} = {value!r} is not one of {allowed}")
        name_value = body.get("name", "")
        if (
            isinstance(name_value, str)
            and len(name_value.replace("${uniqueString(storage.id)}", "x" * 13)) > 64
        ):
            problem(f"{where}: deployment name may exceed 64 characters")


def check_example_parameters(tree: dict[str, Any]) -> None:
    raw = EXAMPLE_PARAMETERS.read_text()
    if not raw.isascii():
        problem(f"{EXAMPLE_PARAMETERS.name}: contains non-ASCII characters")
    values = json.loads(raw)["parameters"]
    declared = declared_parameters(tree)
    for name, entry in values.items():
        if name not in declared:
            problem(f"{EXAMPLE_PARAMETERS.name}: {name} is not a parameter of main.bicep")
            continue
        allowed = allowed_values(declared[name])
        if allowed is not None and entry["value"] not in allowed:
            problem(f"{EXAMPLE_PARAMETERS.name}: {name} = {entry['value']!r} is not one of {allowed}")
    for name, parameter in declared.items():
        if parameter.get("default") is None and name not in values:
            problem(f"{EXAMPLE_PARAMETERS.name}: the required parameter {name} is missing")
    account = values.get("storageAccountName", {}).get("value", "")
    if account and not re.fullmatch(r"[a-z0-9]{3,24}", account):
        problem(
            f"{EXAMPLE_PARAMETERS.name}: storageAccountName {account!r} is not 3-24 lowercase letters and digits"
        )


def main() -> int:
    files = sorted(INFRA.rglob("*.bicep"))
    parsed: dict[Path, dict[str, Any]] = {}
    for path in files:
        tree = parse(path)
        if tree is not None:
            parsed[path.resolve()] = tree
    for path, tree in parsed.items():
        check_resources(path, tree)
        check_parameters(path, tree)
        check_modules(path, tree, parsed)
    if MAIN.resolve() in parsed:
        check_example_parameters(parsed[MAIN.resolve()])
    for message in problems:
        print(message)
    print(f"{len(files)} Bicep files checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
