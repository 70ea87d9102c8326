"""Thin Prefect tasks: each wraps one library call with a name, retries and artifacts."""
