"""The ``journey`` command: a thin wrapper over the library (patient_journey) and, for runs, the
Prefect flows (flows/); its own package, so that the library never imports the Prefect layer."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import pyarrow as pa
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from patient_journey.errors import JourneyError
from patient_journey.settings import DEFAULT_DATA_DIR, load_settings

app = typer.Typer(
    help="patient-journey: surgical journeys from devices, EHR and outcomes.", no_args_is_help=True
)
console = Console()
DEMO_MARKER = ".journey-demo"

EXAMPLE_QUERIES = {
    "Episodes": "select count(*) as episodes from surgical_episode",
    "Episodes by joint and robotic assistance": (
        "select joint, robotic_assisted, count(*) as episodes, round(avg(or_minutes), 1) as avg_or_minutes, "
        "round(avg(length_of_stay_days), 2) as avg_los_days from surgical_episode group by all order by all"
    ),
    "30/90-day readmission and complication rates": (
        "select round(avg(readmission_30d::int) * 100, 1) as readmit_30d_pct, "
        "round(avg(readmission_90d::int) * 100, 1) as readmit_90d_pct, "
        "round(avg(complication_90d::int) * 100, 1) as complication_90d_pct from surgical_episode"
    ),
    "PROM change at 12 months, and the share reaching the MCID": (
        "select prom_instrument, count(prom_change_12m) as with_12m, round(avg(prom_change_12m), 1) as mean_change, "
        "round(avg(prom_mcid_12m::int) * 100, 1) as reached_mcid_pct "
        "from surgical_episode where prom_instrument is not null group by all order by all"
    ),
}


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


def _prefect_defaults() -> None:
    # Prefect's ephemeral server needs longer than its default timeout on small machines.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect does not create PREFECT_HOME's parents: with one missing, its temporary server
    # timed out two minutes later with a database error instead of saying so.
    home = os.environ.get("PREFECT_HOME")
    if home:
        Path(home).expanduser().mkdir(parents=True, exist_ok=True)


def print_markdown(text: str) -> None:
    """The run summary as text: its links (``[/path](file:///path)``) are not Rich markup."""
    console.print(text, markup=False, highlight=False)


def print_table(table: pa.Table, output: OutputFormat = OutputFormat.table, title: str | None = None) -> None:
    if output is OutputFormat.csv:
        import pyarrow.csv as pacsv

        sink = pa.BufferOutputStream()
        pacsv.write_csv(_flat_for_csv(table), sink)
        sys.stdout.write(sink.getvalue().to_pybytes().decode())
        return
    if output is OutputFormat.json:
        import orjson

        sys.stdout.write(orjson.dumps(table.to_pylist(), default=str).decode() + "\n")
        return
    # Wrapped, never cut: at 80 columns a suggested query showed `pat…` and dates as `2023-06-…`.
    view = Table(title=title)
    for name in table.column_names:
        view.add_column(name, overflow="fold")
    for row in table.to_pylist():
        view.add_row(*["" if v is None else str(v) for v in row.values()])
    console.print(view)


def _flat_for_csv(table: pa.Table) -> pa.Table:
    """List, struct and map columns (``devices_used``, say) as JSON text: CSV has only scalars."""
    import orjson

    for index, field in enumerate(table.schema):
        if pa.types.is_nested(field.type):
            text = [
                None if v is None else orjson.dumps(v, default=str).decode()
                for v in table.column(index).to_pylist()
            ]
            table = table.set_column(index, field.name, pa.array(text, pa.string()))
    return table


def _fail(exc: JourneyError) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(str(exc))}")
    raise typer.Exit(code=2)


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Folder to write landing/ and ground_truth/ into.")],
    patients: Annotated[int, typer.Option(min=1, help="Number of patients (one episode each).")] = 300,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same bytes.")] = 42,
    bad_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of planted bad records per kind.")
    ] = 0.02,
    fhir_layout: Annotated[
        str,
        typer.Option(
            help="The first EHR export: bulk (NDJSON per resource type) or synthea (a transaction "
            "Bundle per patient, named after the patient, with urn:uuid references)."
        ),
    ] = "bulk",
) -> None:
    """Write synthetic surgical journeys in the formats real systems write, with ground truth."""
    from patient_journey.generate import generate as run_generate

    try:
        result = run_generate(out, patients=patients, seed=seed, bad_rate=bad_rate, fhir_layout=fhir_layout)
    except (FileExistsError, ValueError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    console.print(
        f"Wrote {result.patients} patients, {result.episodes} episodes, "
        f"{sum(result.resources.values())} FHIR resources, {result.device_messages} device messages "
        f"and {sum(result.planted.values())} planted bad records to {out}"
    )


@app.command()
def run(
    source: Annotated[list[str] | None, typer.Option(help="Only these sources (repeatable).")] = None,
    rebuild: Annotated[bool, typer.Option(help="Rebuild silver and gold even with no new input.")] = False,
) -> None:
    """Run the patient-journey Prefect flow once with the configured settings."""
    _prefect_defaults()
    try:
        load_settings().patient_hmac_key()
    except JourneyError as exc:
        _fail(exc)
    from flows.journey import Source, patient_journey
    from patient_journey.report import render_markdown

    try:
        chosen = [Source(s) for s in source] if source else None
    except ValueError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(code=2) from exc
    try:
        summary = patient_journey(sources=chosen, rebuild=rebuild)
    except JourneyError as exc:
        _fail(exc)
    print_markdown(render_markdown(summary))
    quality = load_settings().quality
    below = summary.below_linkage_floor(quality.min_linkage_rate, quality.min_linkage_rows)
    if below:
        from patient_journey.report import linkage_warning

        console.print(f"[yellow]warning:[/yellow] {escape(linkage_warning(below, quality.min_linkage_rate))}")
    if not summary.balanced or below:
        raise typer.Exit(code=1)


DEFAULT_PREFECT_HOME = DEFAULT_DATA_DIR / "prefect"


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port of the Prefect server and UI.")] = 4200,
    home: Annotated[
        Path, typer.Option(help="PREFECT_HOME of the local stack: database, logs, serve.json.")
    ] = DEFAULT_PREFECT_HOME,
) -> None:
    """Start a local Prefect server, a process work pool with a worker, and the deployments of
    infra/prefect.yaml; runs until Ctrl-C or `journey stop`, then stops what it started."""
    import time

    from patient_journey import pipeline
    from patient_journey.operate import LocalPrefect

    try:  # deployments that would fail at their first step are not started
        pipeline.preflight(load_settings())
    except JourneyError as exc:
        demo_key = (DEFAULT_DATA_DIR / "demo-patient-key").resolve()
        hint = (
            f" To serve the demo's warehouse: export JOURNEY_IDENTITY__PATIENT_KEY_FILE={demo_key}"
            if demo_key.exists()
            else ""
        )
        console.print(
            f"[red]error:[/red] every deployment would fail its preflight: {escape(str(exc))}\n"
            f"Export the settings the worker needs (README, Configuration) before `journey serve`.{hint}"
        )
        raise typer.Exit(code=2) from None
    stack = LocalPrefect(home=home.resolve(), port=port)
    try:
        with console.status("Starting the Prefect server, work pool, deployments and worker..."):
            stack.start()
        console.print(f"Prefect UI: [bold]{stack.ui_url}[/bold] (API {stack.api_url}); logs in {stack.home}.")
        console.print(
            "Deployments: ingest-device, ingest-ehr, ingest-outcomes, journey-build, backfill, "
            "patient-journey. Ctrl-C or `journey stop` stops the server and the worker."
        )
        while all(p is not None and p.poll() is None for p in (stack.server, stack.worker)):
            time.sleep(1)
    except JourneyError as exc:
        stack.stop()
        _fail(exc)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        console.print("Stopped the Prefect worker and server.")


@app.command()
def stop(
    home: Annotated[Path, typer.Option(help="PREFECT_HOME given to `journey serve`.")] = DEFAULT_PREFECT_HOME,
) -> None:
    """Stop the server and worker that `journey serve` started."""
    from patient_journey.operate import stop_recorded

    stopped = stop_recorded(home.resolve())
    console.print(f"Stopped: {', '.join(stopped)}." if stopped else "Nothing to stop.")


@app.command()
def query(
    sql: Annotated[str | None, typer.Argument(help="DuckDB SQL; tables are visible by name.")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Read the SQL from this file.")] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
    to: Annotated[Path | None, typer.Option(help="With --output parquet: the file to write.")] = None,
) -> None:
    """Run read-only SQL over the warehouse (silver and gold Delta tables); every statement's
    result is shown. `journey tables` lists the tables and their columns."""
    from patient_journey.query import run_queries

    if (sql is None) == (file is None):
        console.print("[red]error:[/red] give the SQL as an argument or with --file, not both.")
        raise typer.Exit(code=2)
    if output is OutputFormat.parquet and to is None:
        console.print("[red]error:[/red] --output parquet writes a file: give it with --to FILE.parquet.")
        raise typer.Exit(code=2)
    try:
        text = file.read_text(encoding="utf-8") if file is not None else str(sql)
        results = run_queries(load_settings(), text)
    except OSError as exc:
        console.print(f"[red]error:[/red] cannot read {file}: {exc.strerror}")
        raise typer.Exit(code=2) from None
    except JourneyError as exc:
        _fail(exc)
    for number, result in enumerate(results, start=1):
        if output is OutputFormat.parquet:
            import pyarrow.parquet as pq

            assert to is not None
            target = to if len(results) == 1 else to.with_name(f"{to.stem}-{number}{to.suffix}")
            pq.write_table(result, target)
            console.print(f"{result.num_rows} row(s) written to {target.resolve()}")
            continue
        title = (
            f"statement {number} of {len(results)}"
            if len(results) > 1 and output is OutputFormat.table
            else None
        )
        print_table(result, output, title=title)


@app.command()
def patient(
    key: Annotated[str, typer.Argument(help="A patient_key from the warehouse.")],
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """Print one patient's journey as a timeline."""
    from patient_journey.query import patient_timeline

    try:
        timeline = patient_timeline(load_settings(), key)
    except JourneyError as exc:
        _fail(exc)
    if timeline.num_rows == 0:
        console.print("No events for that patient key.")
        raise typer.Exit(code=1)
    print_table(timeline, output, title=f"Journey of patient {key[:12]}…")


class DemoStorage(StrEnum):
    local = "local"
    azurite = "azurite"


@app.command()
def check() -> None:
    """Probe every storage zone (list landing; write and delete a probe in the others)."""
    from patient_journey.storage import azure_access, check_zones

    try:
        settings = load_settings()
        access = azure_access(settings)
        zones = check_zones(settings)
    except JourneyError as exc:
        _fail(exc)
    if access is not None:
        console.print(f"Azure account {access.account_name} at {access.endpoint}, auth: {access.auth}")
    print_table(
        pa.table({"zone": list(zones), "location": list(zones.values()), "status": ["ok"] * len(zones)})
    )


@app.command()
def tables(
    markdown: Annotated[bool, typer.Option(help="Print docs/warehouse.md's table section instead.")] = False,
) -> None:
    """The warehouse's tables: grain, key and typed columns, from their declarations."""
    from patient_journey.contracts import all_contracts, render_markdown

    if markdown:
        sys.stdout.write(render_markdown())
        return
    for contract in all_contracts():
        key = f"; key {', '.join(contract.key)}" if contract.key else ""
        print_table(
            pa.table(
                {
                    "column": [c.name for c in contract.columns],
                    "type": [c.type for c in contract.columns],
                    "meaning": [c.description for c in contract.columns],
                }
            ),
            title=f"{contract.label}: {contract.grain}{key}",
        )


@app.command()
def lineage(
    key: Annotated[str, typer.Argument(help="An input_key from the warehouse (or its first characters).")],
) -> None:
    """Name the input behind an input_key (restricted: prints landing paths, which can carry PHI)."""
    from patient_journey.pipeline import find_input

    try:
        found = find_input(load_settings(), key)
    except JourneyError as exc:
        _fail(exc)
    if not found:
        console.print("No input has that key.")
        raise typer.Exit(code=1)
    print_table(pa.table({"source": [s for s, _ in found], "input": [u for _, u in found]}))


@app.command()
def reprocess(
    source: Annotated[
        str,
        typer.Argument(help="The source's name (`journey generate` writes one of each; docs/sources.md)."),
    ],
    prefix: Annotated[
        str, typer.Option(help="Only inputs under this landing prefix (registry: a table name).")
    ] = "",
) -> None:
    """Forget inputs already processed, so the next run reads them again (nothing loads twice)."""
    from patient_journey.pipeline import forget_inputs

    try:
        forgotten = forget_inputs(load_settings(), source, prefix)
    except JourneyError as exc:
        _fail(exc)
    console.print(f"{forgotten} {source} input(s) will be read again on the next run.")


@app.command()
def azurite(
    data_dir: Annotated[Path, typer.Option(help="Where Azurite keeps its blobs.")] = DEFAULT_DATA_DIR
    / "azurite",
    seed_from: Annotated[
        Path | None, typer.Option(help="Upload this generated folder's landing/ to the landing container.")
    ] = None,
) -> None:
    """Run Azurite (the Azure Storage emulator) in the foreground with the four containers."""
    import time

    from patient_journey.azurite import Azurite, upload_folder

    try:
        emulator = Azurite(data_dir).start()
    except JourneyError as exc:
        _fail(exc)
    try:
        if seed_from is not None:
            count = upload_folder(seed_from / "landing", "az://landing", emulator.connection_string)
            console.print(f"Uploaded {count} files from {seed_from / 'landing'} to az://landing.")
        console.print("Azurite is running. Point patient-journey at it with:")
        for name, value in emulator.environment().items():
            sys.stdout.write(f"export {name}='{value}'\n")
        console.print("Press Ctrl-C to stop.")
        while emulator.process is not None and emulator.process.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        emulator.stop()


@app.command()
def demo(
    patients: Annotated[int, typer.Option(min=1)] = 300,
    seed: Annotated[int, typer.Option()] = 42,
    data_dir: Annotated[
        Path, typer.Option(help="Folder for the demo's sources and warehouse.")
    ] = DEFAULT_DATA_DIR,
    storage: Annotated[
        DemoStorage,
        typer.Option(help="local: folders under --data-dir; azurite: blob containers in a local Azurite."),
    ] = DemoStorage.local,
    fresh: Annotated[bool, typer.Option(help="Start over: new sources, warehouse and key.")] = False,
) -> None:
    """Generate patients, run the flow on the embedded default, and show a few queries.

    A second demo keeps the key and the warehouse (so patient keys stay the same) and reads
    nothing twice; `--fresh` starts over with a new key. The Prefect home of `journey serve`
    (<data-dir>/prefect) is never touched."""
    from patient_journey.generate import generate as run_generate

    marker = data_dir / DEMO_MARKER
    # the folder may already hold `journey serve`'s Prefect home (DEFAULT_PREFECT_HOME), nothing else
    foreign = [p.name for p in data_dir.iterdir() if p.name != "prefect"] if data_dir.is_dir() else []
    if foreign and not marker.exists():
        console.print(
            f"[red]error:[/red] {data_dir.resolve()} exists and was not made by `journey demo`; choose --data-dir."
        )
        raise typer.Exit(code=2)
    made = f"patients={patients} seed={seed} storage={storage.value}"
    if marker.exists() and not fresh and marker.read_text().strip().splitlines()[-1:] != [made]:
        console.print(
            f"[red]error:[/red] {data_dir.resolve()} holds a demo made with other options "
            f"({marker.read_text().strip().splitlines()[-1]}); run `journey demo --fresh` to start over."
        )
        raise typer.Exit(code=2)
    if fresh:  # the demo's own folders and key; never the served stack's Prefect home
        for name in ("landing", "ground_truth", "warehouse", "restricted", "azurite", "demo-patient-key"):
            target = data_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"made by journey demo; `journey demo --fresh` starts over\n{made}\n")
    os.environ["JOURNEY_STORAGE__LANDING_URL"] = str((data_dir / "landing").resolve())
    os.environ["JOURNEY_STORAGE__WAREHOUSE_URL"] = str((data_dir / "warehouse").resolve())
    os.environ["JOURNEY_STORAGE__RESTRICTED_URL"] = str((data_dir / "restricted").resolve())
    os.environ["JOURNEY_SOURCES__SETTLE_SECONDS"] = "0"  # the generator has just finished writing
    key_file = (data_dir / "demo-patient-key").resolve()
    configured_file = os.environ.get("JOURNEY_IDENTITY__PATIENT_KEY_FILE")
    if not (
        os.environ.get("JOURNEY_IDENTITY__PATIENT_KEY")
        or (configured_file and configured_file != str(key_file))
    ):
        if not key_file.exists():
            key_file.write_text(secrets.token_hex(32))
            key_file.chmod(0o600)
            console.print(
                f"[yellow]Created a local demo patient key at {key_file}.[/yellow] It is for the demo only: "
                "real runs refuse to start without a configured key (JOURNEY_IDENTITY__PATIENT_KEY)."
            )
        os.environ["JOURNEY_IDENTITY__PATIENT_KEY_FILE"] = str(key_file)
    if (data_dir / "landing").exists():
        console.print(
            f"[1/3] Using the generated sources in {(data_dir / 'landing').resolve()} (same options)."
        )
    else:
        with console.status(f"Generating {patients} synthetic surgical journeys..."):
            result = run_generate(data_dir, patients=patients, seed=seed)
        console.print(
            f"[1/3] Generated {result.episodes} episodes: {sum(result.resources.values())} FHIR resources, "
            f"{result.device_messages} device messages, registry and REDCap outcomes, "
            + "".join(f"{count} {name.replace('_', ' ')}, " for name, count in result.derived.items())
            + f"{sum(result.planted.values())} planted bad records."
        )
    emulator = None
    if storage is DemoStorage.azurite:
        from patient_journey.azurite import Azurite, upload_folder

        try:
            emulator = Azurite(data_dir / "azurite").start()
        except JourneyError as exc:
            _fail(exc)
        with console.status("Uploading the landing zone to Azurite..."):
            count = upload_folder(data_dir / "landing", "az://landing", emulator.connection_string)
        console.print(
            f"      Started Azurite at {emulator.endpoint}; uploaded {count} files to az://landing."
        )
        os.environ.update(emulator.environment())
        # The registry is a database, not a blob: the flow reads the generated SQLite directly.
        registry = data_dir.resolve() / "landing" / "outcomes" / "registry.sqlite"
        os.environ["JOURNEY_SOURCES__REGISTRY_URL"] = f"sqlite:///{registry}"
    try:
        _run_demo_flow()
    finally:
        if emulator is not None:
            emulator.stop()
            console.print(
                f"Azurite stopped; its blobs stay in {data_dir / 'azurite'}. "
                f"`journey azurite --data-dir {data_dir / 'azurite'}` starts it again."
            )


def _run_demo_flow() -> None:
    console.print("[2/3] Running the patient-journey flow (Prefect starts a local server first)...")
    _prefect_defaults()
    from flows.journey import patient_journey
    from patient_journey.query import run_query
    from patient_journey.report import render_markdown

    summary = patient_journey()
    print_markdown(render_markdown(summary))
    console.print('[3/3] Example queries (`journey query "SQL"`):')
    settings = load_settings()
    for title, sql in EXAMPLE_QUERIES.items():
        console.print(f'\n[bold]{title}[/bold]\n$ journey query "{sql}"')
        print_table(run_query(settings, sql))
    console.print(
        f'\nWarehouse: {settings.storage.warehouse_url}. Try: journey query "select * from journey_event limit 10"'
    )
