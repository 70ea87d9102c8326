"""Prefect flows. Import ``flows.patient_journey:patient_journey`` to deploy the main flow."""
