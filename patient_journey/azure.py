"""Azure Blob Storage access in one place.

``AzureAccess`` turns the ``azure`` settings into what each engine needs: a blob SDK client
(files: landing discovery, reads, probes), storage options for delta-rs (every Delta table) and
a secret for DuckDB (analysts' queries). ``storage_failure`` turns any storage exception into a
``StorageError`` that names the operation and the container and never carries a key, token or
connection string: the original exception text is never repeated, since SDK messages can hold
signed URLs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from patient_journey.errors import ConfigurationError, StorageError
from patient_journey.settings import AzureAuth, AzureSettings

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.storage.blob import BlobServiceClient, ContainerClient

BLOB_SCHEMES = ("az", "abfs", "abfss", "azure")
STORAGE_SCOPE = "https://storage.azure.com/.default"

# Azure error codes -> what an operator should read. Never the service's own message text.
_REASONS = {
    "AuthenticationFailed": (
        "the storage account refused the credentials (wrong account key, or a SAS token that is "
        "expired, not yet valid or malformed)"
    ),
    "InvalidAuthenticationInfo": "the storage account refused the credentials (malformed or expired)",
    "NoAuthenticationInformation": "no credentials were sent (set JOURNEY_AZURE__AUTH and its secret)",
    "AuthorizationFailure": (
        "the storage account refused the request: the credentials do not allow it (a SAS token "
        "that is expired or lacks this permission, or a missing role assignment)"
    ),
    "AuthorizationPermissionMismatch": (
        "the credentials lack the permission for this operation (e.g. a read-only SAS token, or a "
        "Reader role where Storage Blob Data Contributor is needed)"
    ),
    "AuthorizationResourceTypeMismatch": "the SAS token does not cover this resource type",
    "AuthorizationServiceMismatch": "the SAS token does not cover the blob service",
    "KeyBasedAuthenticationNotPermitted": (
        "shared-key access is disabled on this account: use JOURNEY_AZURE__AUTH=entra"
    ),
    "ContainerNotFound": "the container does not exist (create it, or correct the zone URL)",
    "AccountIsDisabled": "the storage account is disabled",
    "ContainerBeingDeleted": "the container is being deleted",
}
_UNREACHABLE = (
    "error sending request",
    "connection refused",
    "dns error",
    "failed to establish a new connection",
    "name or service not known",
    "timed out",
    "connection reset",
)
UNREACHABLE_REASON = "the storage endpoint could not be reached (network, firewall or endpoint setting)"


@dataclass(frozen=True)
class BlobLocation:
    """A blob URL split into its parts: ``az://container/prefix`` or the abfss form."""

    scheme: str
    container: str
    prefix: str
    account: str | None = None

    def url(self, path: str) -> str:
        """The URL of a blob path inside this location's container, in the same form."""
        host = f"{self.container}@{self.account}.dfs.core.windows.net" if self.account else self.container
        return f"{self.scheme}://{host}/{path.lstrip('/')}"


def is_blob_url(url: str) -> bool:
    return "://" in url and url.split("://", 1)[0].lower() in BLOB_SCHEMES


def parse_blob_url(url: str) -> BlobLocation:
    scheme, rest = url.split("://", 1)
    host, _, prefix = rest.partition("/")
    account = None
    if "@" in host:
        host, _, domain = host.partition("@")
        account = domain.split(".", 1)[0]
    if not host:
        raise ConfigurationError(f"The storage URL {url!r} names no container.")
    return BlobLocation(scheme.lower(), host, prefix.strip("/"), account)


def _connection_string_parts(text: str) -> dict[str, str]:
    parts = {}
    for item in text.split(";"):
        key, sep, value = item.partition("=")
        if sep:
            parts[key.strip()] = value.strip()
    return parts


class AzureAccess:
    """The resolved Azure settings: account, endpoint, authentication and their secrets."""

    def __init__(self, settings: AzureSettings) -> None:
        self.settings = settings
        parts: dict[str, str] = {}
        if settings.connection_string is not None:
            parts = _connection_string_parts(settings.connection_string.get_secret_value())
        self.auth: AzureAuth = settings.auth or self._infer_auth(settings)
        self.account_name = settings.account_name or parts.get("AccountName")
        self.account_key = (
            settings.account_key.get_secret_value() if settings.account_key else parts.get("AccountKey")
        )
        sas = (
            settings.sas_token.get_secret_value()
            if settings.sas_token
            else parts.get("SharedAccessSignature")
        )
        self.sas_token = sas.lstrip("?") if sas else None
        if not self.account_name:
            raise ConfigurationError(
                "Azure storage is used but no account name is set: set JOURNEY_AZURE__ACCOUNT_NAME "
                "(or an AccountName in JOURNEY_AZURE__CONNECTION_STRING)."
            )
        # Only a non-default endpoint (Azurite, sovereign clouds) is passed on to delta-rs.
        self.custom_endpoint = bool(settings.endpoint or parts.get("BlobEndpoint"))
        self.endpoint = (
            settings.endpoint
            or parts.get("BlobEndpoint")
            or f"https://{self.account_name}.blob.core.windows.net"
        ).rstrip("/")
        needed = {
            "connection_string": settings.connection_string,
            "account_key": self.account_key,
            "sas": self.sas_token,
        }
        if self.auth != "entra" and not needed[self.auth]:
            variable = {"sas": "SAS_TOKEN"}.get(self.auth, self.auth.upper())
            raise ConfigurationError(
                f"JOURNEY_AZURE__AUTH is {self.auth} but JOURNEY_AZURE__{variable} is not set."
            )

    @staticmethod
    def _infer_auth(settings: AzureSettings) -> AzureAuth:
        if settings.connection_string is not None:
            return "connection_string"
        if settings.account_key is not None:
            return "account_key"
        if settings.sas_token is not None:
            return "sas"
        return "entra"

    @property
    def is_local_emulator(self) -> bool:
        return self.endpoint.startswith("http://")

    @cached_property
    def token_credential(self) -> TokenCredential:
        """A service principal when one is configured, else DefaultAzureCredential's chain."""
        from azure.identity import ClientSecretCredential, DefaultAzureCredential

        s = self.settings
        if s.tenant_id and s.client_id and s.client_secret:
            return ClientSecretCredential(s.tenant_id, s.client_id, s.client_secret.get_secret_value())
        return DefaultAzureCredential()

    @cached_property
    def service(self) -> BlobServiceClient:
        """A blob service client with bounded retries and timeouts (fail fast, never hang)."""
        from azure.core.credentials import AzureNamedKeyCredential
        from azure.storage.blob import BlobServiceClient, ExponentialRetry

        credential: TokenCredential | AzureNamedKeyCredential | str
        if self.auth == "entra":
            credential = self.token_credential
        elif self.auth == "sas":
            credential = str(self.sas_token)
        else:
            credential = AzureNamedKeyCredential(str(self.account_name), str(self.account_key))
        timeout = self.settings.timeout_seconds
        return BlobServiceClient(
            self.endpoint,
            credential=credential,
            retry_policy=ExponentialRetry(
                initial_backoff=1, increment_base=2, retry_total=self.settings.max_retries
            ),
            connection_timeout=min(timeout, 10),
            read_timeout=timeout,
        )

    def container(self, name: str) -> ContainerClient:
        return self.service.get_container_client(name)

    def delta_options(self) -> dict[str, str]:
        """delta-rs (object_store) storage options, with the same retry bounds as the SDK."""
        options = {
            "account_name": str(self.account_name),
            "max_retries": str(self.settings.max_retries),
            "retry_timeout": f"{self.settings.timeout_seconds}s",
            "timeout": f"{self.settings.timeout_seconds * 4}s",
            "connect_timeout": f"{min(self.settings.timeout_seconds, 10)}s",
        }
        if self.custom_endpoint:
            options["azure_storage_endpoint"] = self.endpoint
        if self.is_local_emulator:
            options["allow_http"] = "true"
        if self.auth == "entra":
            options["bearer_token"] = self.token_credential.get_token(STORAGE_SCOPE).token
        elif self.auth == "sas":
            options["sas_token"] = str(self.sas_token)
        else:
            options["account_key"] = str(self.account_key)
        return options

    def duckdb_secret_sql(self) -> str:
        """``CREATE SECRET`` for DuckDB's azure extension (used by ``delta_scan``)."""
        s = self.settings
        if self.auth == "entra" and s.tenant_id and s.client_id and s.client_secret:
            return (
                "CREATE SECRET journey_azure (TYPE azure, PROVIDER service_principal, "
                f"TENANT_ID '{s.tenant_id}', CLIENT_ID '{s.client_id}', "
                f"CLIENT_SECRET '{s.client_secret.get_secret_value()}', ACCOUNT_NAME '{self.account_name}')"
            )
        if self.auth == "entra":
            return f"CREATE SECRET journey_azure (TYPE azure, PROVIDER credential_chain, ACCOUNT_NAME '{self.account_name}')"
        protocol = "http" if self.is_local_emulator else "https"
        if self.auth == "sas":
            text = f"BlobEndpoint={self.endpoint};SharedAccessSignature={self.sas_token}"
        else:
            text = (
                f"DefaultEndpointsProtocol={protocol};AccountName={self.account_name};"
                f"AccountKey={self.account_key};BlobEndpoint={self.endpoint};"
            )
        return f"CREATE SECRET journey_azure (TYPE azure, CONNECTION_STRING '{text}')"


def failure_reason(exc: BaseException) -> tuple[str, bool]:
    """What went wrong, in words safe to show, and whether retrying could help."""
    from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError, ServiceResponseError

    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)  # the SDK gives a StorageErrorCode enum
    text = str(exc)
    if code is None:
        found = re.search(r"<Code>(\w+)</Code>|ErrorCode:(\w+)", text)
        if found:
            code = found.group(1) or found.group(2)
    if code is not None and str(code) in _REASONS:
        return _REASONS[str(code)], False
    if type(exc).__name__ == "CredentialUnavailableError":
        return (
            "no Microsoft Entra ID credential is available (managed identity, workload identity or az login)",
            False,
        )
    if isinstance(exc, ServiceRequestError | ServiceResponseError) or any(
        marker in text.lower() for marker in _UNREACHABLE
    ):
        return UNREACHABLE_REASON, True
    if isinstance(exc, ClientAuthenticationError):
        return _REASONS["AuthenticationFailed"], False
    if code is not None:
        return f"the storage service answered with error code {code}", False
    return f"an unexpected storage error ({type(exc).__name__})", False


def storage_failure(exc: BaseException, operation: str, url: str) -> StorageError:
    """A ``StorageError`` naming the operation and the container, with no secret in it."""
    reason, transient = failure_reason(exc)
    if is_blob_url(url):
        location = parse_blob_url(url)
        where = f"container '{location.container}'"
        # a read is of a landed input, whose path can carry a patient's name: the container only
        if location.prefix and operation != "read":
            where += f" (path '{location.prefix}')"
    else:
        where = "a landed input" if operation == "read" else f"'{url}'"
    return StorageError(f"Storage operation '{operation}' failed on {where}: {reason}.", transient)
