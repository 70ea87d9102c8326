"""Prefect flows. Import ``flows.journey:patient_journey`` to deploy the main flow."""
