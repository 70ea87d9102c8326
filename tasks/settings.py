"""Settings for the tasks: the library's one configuration entry point, plus Prefect blocks.

Tasks never take settings as parameters (they may hold secrets, and parameters are shown in the
UI). With ``JOURNEY_AZURE__CREDENTIALS_BLOCK`` set, the Azure credentials come from that
prefect-azure ``AzureBlobStorageCredentials`` block, kept encrypted by the Prefect server.
"""

from __future__ import annotations

from typing import cast
from urllib.parse import urlparse

from patient_journey.errors import ConfigurationError
from patient_journey.settings import AzureSettings, JourneySettings, load_settings


def azure_from_block(azure: AzureSettings, name: str) -> AzureSettings:
    """The Azure settings with the block's connection string, or its account URL (Entra ID,
    optionally a service principal) in place of whatever the environment gave."""
    from prefect_azure import AzureBlobStorageCredentials

    try:
        block = cast(AzureBlobStorageCredentials, AzureBlobStorageCredentials.load(name))
    except ValueError:
        raise ConfigurationError(
            f"No AzureBlobStorageCredentials block named {name!r} (JOURNEY_AZURE__CREDENTIALS_BLOCK)."
        ) from None
    if block.connection_string is not None:
        return azure.model_copy(
            update={"auth": "connection_string", "connection_string": block.connection_string}
        )
    account_url = str(block.account_url)
    return azure.model_copy(
        update={
            "auth": "entra",
            "endpoint": account_url,
            "account_name": azure.account_name or urlparse(account_url).netloc.split(".", 1)[0],
            "tenant_id": block.tenant_id,
            "client_id": block.client_id,
            "client_secret": block.client_secret,
        }
    )


def journey_settings() -> JourneySettings:
    settings = load_settings()
    block = settings.azure.credentials_block
    if block:
        settings = settings.model_copy(update={"azure": azure_from_block(settings.azure, block)})
    return settings
