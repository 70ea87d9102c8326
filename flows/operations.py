"""Operator set-up on a Prefect server: the sample quarantine alert (a notification block and
the automation of ``infra/automations/quarantine-alert.yaml``). ``journey serve`` runs
``python -m flows.operations`` against its server; it can be run by hand the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore

from patient_journey.settings import load_settings, shipped

ALERTS_BLOCK = "patient-journey-alerts"
PLACEHOLDER = "ALERTS_BLOCK_DOCUMENT_ID"
AUTOMATIONS = shipped("infra", "automations")


def automation_documents(block_id: str, folder: Path = AUTOMATIONS) -> list[dict[str, Any]]:
    """The automation files, with the notification block's id in place of the placeholder."""
    return [
        yaml.safe_load(path.read_text().replace(PLACEHOLDER, block_id))
        for path in sorted(folder.glob("*.yaml"))
    ]


def register_alerts(webhook_url: str) -> list[str]:
    """Create (or replace) the alerts block and the automations; returns the automation names."""
    block = CustomWebhookNotificationBlock.model_validate(
        {
            "name": ALERTS_BLOCK,
            "url": webhook_url,
            "json_data": {"subject": "{{subject}}", "text": "{{body}}"},
        }
    )
    block_id = block.save(ALERTS_BLOCK, overwrite=True)
    names = []
    with get_client(sync_client=True) as client:
        for document in automation_documents(str(block_id)):
            automation = AutomationCore.model_validate(document)
            for existing in client.read_automations_by_name(automation.name):
                client.delete_automation(existing.id)
            client.create_automation(automation)
            names.append(automation.name)
    return names


if __name__ == "__main__":
    url = load_settings().orchestration.alert_webhook_url
    if url is None:
        print("JOURNEY_ORCHESTRATION__ALERT_WEBHOOK_URL is not set: no alert automation created.")
    else:
        for name in register_alerts(url.get_secret_value()):
            print(f"automation created: {name}")
