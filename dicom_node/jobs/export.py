"""Sending result objects (SR, SEG, Parametric Maps) to the configured DICOM destinations.

An analysed series' objects are written once to ``home/outputs/<study>/<series>/`` and one
*export* row per destination is queued in the node database. Exports run on their own thread
of the worker process (:func:`run_forever`), never in the analysis queue, so a destination that
refuses, times out or answers a failure delays nothing else. Each failed send is retried after an
exponential backoff (``node_export_backoff_seconds`` doubling, capped at
``node_export_backoff_max_seconds``); after ``node_export_max_attempts`` sends the export is
*dead* (a dead letter) until ``her2low export retry`` re-queues it. State lives in the database,
so a restarted worker resumes where it stopped; a batch is always re-sent whole with the same SOP
Instance UIDs, so a PACS keeps exactly one copy of each object.

Destinations (``node_export_destinations``) are resolved by name at send time: fixing a
destination's address in the configuration and retrying is enough. A destination with
``calling_aets`` only receives results of series sent to the node by those AE titles; one
without receives everything. A destination is reached by C-STORE (:mod:`.export_scu`) or, when
it has a ``stow_url``, by DICOMweb STOW-RS (:mod:`.export_stow`); both answer the same
:class:`SendResult`, so retries and dead letters work alike.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Enum, Float, Integer, String, Text, UniqueConstraint, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from dicom_node.db import Base
from dicom_node.jobs.export_scu import SendOutcome, SendResult, store_files
from dicom_node.jobs.export_stow import stow_entry, stow_files
from dicom_node.jobs.results_state import ExportReported  # noqa: F401  (same metadata)
from her2low.core.settings import ConfigurationError, Settings
from models.contract import ExportState  # one enum: the node's rows are what it reports

__all__ = [
    "Destination",
    "DestinationKind",
    "Export",
    "ExportPolicy",
    "ExportState",
    "destinations_from_settings",
    "retry",
    "run_due",
    "run_forever",
    "schedule",
]

log = logging.getLogger(__name__)

#: A send that has not reported back after this long is taken to have died with its worker.
LEASE_SECONDS = 600.0


class Export(Base):
    """One batch of result objects for one destination."""

    __tablename__ = "exports"
    __table_args__ = (UniqueConstraint("destination", "batch_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    destination: Mapped[str] = mapped_column(String(64), index=True)
    #: Identifies the object set (its SR's SOP Instance UID): a repeated analysis is one export.
    batch_key: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    source_series_uid: Mapped[str] = mapped_column(String(64), index=True)
    #: JSON list of file paths, SR first.
    paths: Mapped[str] = mapped_column(Text)
    state: Mapped[ExportState] = mapped_column(
        Enum(ExportState, native_enum=False, length=16), default=ExportState.PENDING, index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[float] = mapped_column(Float, default=0.0, index=True)
    lease_expires_at: Mapped[float] = mapped_column(Float, default=0.0)
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)
    sent_at: Mapped[float] = mapped_column(Float, default=0.0)

    def file_paths(self) -> list[Path]:
        return [Path(p) for p in json.loads(self.paths)]


class DestinationKind(enum.StrEnum):
    """How the results reach a destination."""

    #: C-STORE over a DICOM association (``ae_title``, ``host``, ``port``, optional TLS).
    DIMSE = "dimse"
    #: DICOMweb STOW-RS, one HTTP(S) POST per batch (``stow_url``).
    STOW = "stow"


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP or a STOW-RS endpoint the results go to (``node_export_destinations``)."""

    name: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    tls: bool = False
    #: PEM CA bundle to verify the destination's certificate (default: the system store).
    tls_ca: str | None = None
    #: Source calling AE titles this destination serves; empty = every source.
    calling_aets: tuple[str, ...] = ()
    kind: DestinationKind = DestinationKind.DIMSE
    #: STOW-RS only: the Store Instances URL (``https://pacs/dicom-web/studies``).
    stow_url: str = ""
    #: STOW-RS only: a file holding the bearer token (the token is never in the settings).
    token_file: str | None = None
    #: PEM client certificate and key this destination wants (mutual TLS, C-STORE or STOW-RS);
    #: default: the node's own ``HER2LOW_NODE_TLS_CERT``/``_KEY`` when they are set.
    tls_cert: str | None = None
    tls_key: str | None = None

    def client_cert(self, policy: ExportPolicy) -> tuple[Path, Path] | None:
        """The certificate and key to present: this destination's, else the node's, else none."""
        if self.tls_cert and self.tls_key:
            return Path(self.tls_cert), Path(self.tls_key)
        if policy.tls_cert is not None and policy.tls_key is not None:
            return policy.tls_cert, policy.tls_key
        return None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Destination:
        """Validate one configured entry; a bad one is a configuration error, not a crash."""
        cert, key = (str(data[k]) if data.get(k) else None for k in ("tls_cert", "tls_key"))
        if (cert is None) != (key is None):
            raise ConfigurationError(
                "HER2LOW_NODE_EXPORT_DESTINATIONS: a client certificate needs both tls_cert "
                "and tls_key"
            )
        if "stow_url" in data:
            name, url, token_file = stow_entry(data)
            return cls(
                name=name,
                kind=DestinationKind.STOW,
                stow_url=url,
                token_file=token_file,
                tls_ca=str(data["tls_ca"]) if data.get("tls_ca") else None,
                calling_aets=tuple(str(a).strip() for a in data.get("calling_aets") or ()),
                tls_cert=cert,
                tls_key=key,
            )
        try:
            ae_title = str(data["ae_title"]).strip()
            host = str(data["host"])
            port = int(data["port"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"HER2LOW_NODE_EXPORT_DESTINATIONS: each entry needs ae_title, host, port ({exc})"
            ) from exc
        if not 0 < len(ae_title) <= 16 or not 0 < port < 65536:
            raise ConfigurationError(
                f"HER2LOW_NODE_EXPORT_DESTINATIONS: bad ae_title {ae_title!r} or port {port}"
            )
        name = str(data.get("name") or f"{ae_title}@{host}:{port}")[:64]
        aets = data.get("calling_aets") or ()
        return cls(
            name=name,
            ae_title=ae_title,
            host=host,
            port=port,
            tls=bool(data.get("tls", False)),
            tls_ca=str(data["tls_ca"]) if data.get("tls_ca") else None,
            calling_aets=tuple(str(a).strip() for a in aets),
            tls_cert=cert,
            tls_key=key,
        )

    def serves(self, calling_aet: str) -> bool:
        return not self.calling_aets or calling_aet.strip() in self.calling_aets


def destinations_from_settings(settings: Settings) -> tuple[Destination, ...]:
    dests = tuple(Destination.from_dict(d) for d in settings.node_export_destinations)
    names = [d.name for d in dests]
    if len(set(names)) != len(names):
        raise ConfigurationError("HER2LOW_NODE_EXPORT_DESTINATIONS: destination names repeat")
    return dests


@dataclass(frozen=True)
class ExportPolicy:
    """Retry policy and SCU identity, from the settings."""

    calling_aet: str
    max_attempts: int = 6
    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 3600.0
    timeout: float = 30.0
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ExportPolicy:
        return cls(
            calling_aet=settings.node_ae_title,
            max_attempts=max(1, settings.node_export_max_attempts),
            backoff_seconds=settings.node_export_backoff_seconds,
            backoff_max_seconds=settings.node_export_backoff_max_seconds,
            timeout=settings.node_export_timeout,
            tls_cert=settings.node_tls_cert,
            tls_key=settings.node_tls_key,
        )

    def delay(self, attempts: int) -> float:
        """Wait after the ``attempts``-th failed send: base · 2^(attempts − 1), capped."""
        return float(min(self.backoff_max_seconds, self.backoff_seconds * 2 ** (attempts - 1)))


def schedule(
    sessions: sessionmaker[Session],
    *,
    destinations: Iterable[Destination],
    paths: Sequence[Path],
    batch_key: str,
    study_uid: str,
    source_series_uid: str,
    calling_aet: str,
    now: float | None = None,
) -> list[int]:
    """Queue ``paths`` for every destination serving ``calling_aet``; returns new export ids.

    A batch already queued or sent to a destination (same ``batch_key``) is left alone: a
    retried analysis job does not send twice.
    """
    now = time.time() if now is None else now
    ids: list[int] = []
    with sessions() as session:
        for dest in destinations:
            if not dest.serves(calling_aet):
                continue
            exists = session.scalar(
                select(Export.id).where(
                    Export.destination == dest.name, Export.batch_key == batch_key
                )
            )
            if exists is not None:
                continue
            row = Export(
                destination=dest.name,
                batch_key=batch_key,
                study_instance_uid=study_uid,
                source_series_uid=source_series_uid,
                paths=json.dumps([str(p) for p in paths]),
                state=ExportState.PENDING,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            ids.append(row.id)
        session.commit()
    return ids


def _claim(sessions: sessionmaker[Session], now: float) -> Export | None:
    """Take the next due export (pending and due, or sending with a dead lease)."""
    with sessions() as session:
        due = session.scalars(
            select(Export)
            .where(
                or_(
                    (Export.state == ExportState.PENDING) & (Export.next_attempt_at <= now),
                    (Export.state == ExportState.SENDING) & (Export.lease_expires_at < now),
                )
            )
            .order_by(Export.next_attempt_at, Export.id)
            .limit(1)
        ).first()
        if due is None:
            return None
        claimed = session.execute(
            update(Export)
            .where(Export.id == due.id, Export.updated_at == due.updated_at)
            .values(
                state=ExportState.SENDING,
                attempts=Export.attempts + 1,
                lease_expires_at=now + LEASE_SECONDS,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return None
        return session.get(Export, due.id, populate_existing=True)


def _tls_context(dest: Destination, policy: ExportPolicy) -> ssl.SSLContext | None:
    if not dest.tls:
        return None
    context = ssl.create_default_context(cafile=dest.tls_ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    client = dest.client_cert(policy)
    if client is not None:
        context.load_cert_chain(certfile=client[0], keyfile=client[1])
    return context


Sender = Callable[[Destination, list[Path], ExportPolicy], SendResult]


def send(dest: Destination, paths: list[Path], policy: ExportPolicy) -> SendResult:
    """One batch to ``dest``, by C-STORE or STOW-RS after its kind (the default :data:`Sender`)."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return SendResult(SendOutcome.FAILED, f"object files missing: {missing[:3]}")
    if dest.kind is DestinationKind.STOW:
        return stow_files(
            paths,
            url=dest.stow_url,
            token_file=Path(dest.token_file) if dest.token_file else None,
            tls_ca=Path(dest.tls_ca) if dest.tls_ca else None,
            client_cert=dest.client_cert(policy),
            timeout=policy.timeout,
        )
    try:
        tls = _tls_context(dest, policy)
    except (OSError, ssl.SSLError) as exc:
        return SendResult(SendOutcome.UNREACHABLE, f"TLS set-up failed: {exc}")
    return store_files(
        paths,
        host=dest.host,
        port=dest.port,
        called_aet=dest.ae_title,
        calling_aet=policy.calling_aet,
        timeout=policy.timeout,
        tls=tls,
    )


def _record(
    sessions: sessionmaker[Session],
    export: Export,
    result: SendResult,
    policy: ExportPolicy,
    now: float,
) -> ExportState:
    with sessions() as session:
        row = session.get(Export, export.id)
        if row is None:
            return ExportState.DEAD
        row.updated_at = now
        row.lease_expires_at = 0.0
        if result.outcome is SendOutcome.SUCCESS:
            row.state = ExportState.DONE
            row.sent_at = now
            row.last_error = ""
        else:
            row.last_error = f"{result.outcome.value}: {result.message}"[:1000]
            if row.attempts >= policy.max_attempts:
                row.state = ExportState.DEAD
            else:
                row.state = ExportState.PENDING
                row.next_attempt_at = now + policy.delay(row.attempts)
        state = row.state
        session.commit()
    return state


def run_due(
    sessions: sessionmaker[Session],
    destinations: Sequence[Destination],
    policy: ExportPolicy,
    *,
    sender: Sender = send,
    limit: int = 100,
) -> list[tuple[int, ExportState]]:
    """Send every due export once (at most ``limit``); returns (id, new state) pairs."""
    by_name = {d.name: d for d in destinations}
    done: list[tuple[int, ExportState]] = []
    for _ in range(limit):
        now = time.time()
        export = _claim(sessions, now)
        if export is None:
            break
        dest = by_name.get(export.destination)
        if dest is None:
            result = SendResult(
                SendOutcome.FAILED, f"destination {export.destination!r} is no longer configured"
            )
        else:
            try:
                result = sender(dest, export.file_paths(), policy)
            except Exception as exc:  # a bug or odd file must not stop the export thread
                log.exception("export send crashed", extra={"export_id": export.id})
                result = SendResult(SendOutcome.FAILED, f"{type(exc).__name__}: {exc}")
        state = _record(sessions, export, result, policy, time.time())
        level = logging.INFO if state is ExportState.DONE else logging.WARNING
        log.log(
            level,
            "export sent" if state is ExportState.DONE else "export failed",
            extra={
                "export_id": export.id,
                "destination": export.destination,
                "attempt": export.attempts,
                "state": state.value,
                "err": result.message[:300],
            },
        )
        done.append((export.id, state))
    return done


def run_forever(
    sessions: sessionmaker[Session],
    destinations: Sequence[Destination],
    policy: ExportPolicy,
    stop: Callable[[], bool],
    *,
    tick: float = 1.0,
) -> None:
    """The export thread of ``her2low worker``: send due exports until ``stop()``."""
    while not stop():
        try:
            run_due(sessions, destinations, policy)
        except Exception:  # keep going; state is in the database
            log.exception("export tick failed")
        time.sleep(tick)


def retry(
    sessions: sessionmaker[Session], ids: Sequence[int] = (), *, all_dead: bool = False
) -> list[int]:
    """Re-queue exports now with a fresh attempt budget: ``ids``, or every dead one."""
    now = time.time()
    with sessions() as session:
        query = select(Export)
        if all_dead:
            query = query.where(Export.state == ExportState.DEAD)
        else:
            query = query.where(Export.id.in_(list(ids)))
        rows = session.scalars(query).all()
        for row in rows:
            row.state = ExportState.PENDING
            row.attempts = 0
            row.next_attempt_at = now
            row.lease_expires_at = 0.0
            row.updated_at = now
        session.commit()
        return [row.id for row in rows]


def counts(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Exports per state (for metrics and `export list`)."""
    with sessions() as session:
        out = {s.value: 0 for s in ExportState}
        for state in session.scalars(select(Export.state)):
            out[ExportState(state).value] += 1
        return out


# --- `her2low export` ---------------------------------------------------------------------------

HELP = "list result exports to DICOM destinations, or retry dead-lettered ones"
DESCRIPTION = (
    "Result objects (SR, SEG, Parametric Maps) are sent by `her2low worker` to the destinations "
    "in HER2LOW_NODE_EXPORT_DESTINATIONS, with retries and backoff. `export list` shows every "
    "export and its state (pending, sending, done, dead); `export retry ID…` or `export retry "
    "--all` re-queues dead exports with a fresh attempt budget."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``export list [--state S] [--json]`` and ``export retry [ID …|--all]``."""
    sub = parser.add_subparsers(dest="export_command", metavar="ACTION", required=True)
    ls = sub.add_parser(
        "list",
        help="exports and their state",
        description="List every export of result objects to a DICOM destination with its "
        "state, attempts and last error, and the count per state.",
        formatter_class=parser.formatter_class,
    )
    ls.add_argument(
        "--state",
        choices=[s.value for s in ExportState],
        default=None,
        help="only exports in this state",
    )
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rt = sub.add_parser(
        "retry",
        help="re-queue dead (or given) exports now",
        description="Re-queue dead exports (the given IDs, or every one with --all) with a "
        "fresh attempt budget; the worker sends them again.",
        formatter_class=parser.formatter_class,
    )
    rt.add_argument("ids", nargs="*", type=int, metavar="ID", help="export IDs (`export list`)")
    rt.add_argument("--all", action="store_true", help="every dead export")


def _sessions(settings: Settings) -> sessionmaker[Session]:
    from dicom_node.db import MIGRATIONS
    from her2low.core.database import make_engine, session_factory

    MIGRATIONS.check_current(settings.node_database_url)
    return session_factory(make_engine(settings.node_database_url))


def _row(e: Export) -> dict[str, Any]:
    return {
        "id": e.id,
        "destination": e.destination,
        "state": ExportState(e.state).value,
        "attempts": e.attempts,
        "study_instance_uid": e.study_instance_uid,
        "source_series_uid": e.source_series_uid,
        "objects": len(json.loads(e.paths)),
        "next_attempt_at": e.next_attempt_at,
        "last_error": e.last_error,
    }


def run(args: argparse.Namespace) -> int:
    """Handler of the parser :func:`add_arguments` filled (0 ok, 2 bad usage)."""
    import sys

    from her2low.core.settings import load_settings

    sessions = _sessions(load_settings())
    if args.export_command == "retry":
        if bool(args.ids) == bool(args.all):
            print("her2low export retry: error: give export IDs or --all", file=sys.stderr)
            return 2
        ids = retry(sessions, args.ids, all_dead=args.all)
        missing = sorted(set(args.ids) - set(ids))
        for i in missing:
            print(f"her2low export retry: no export {i}", file=sys.stderr)
        print(f"re-queued {len(ids)} export(s)")
        return 1 if missing else 0
    with sessions() as session:
        query = select(Export).order_by(Export.id)
        if args.state:
            query = query.where(Export.state == ExportState(args.state))
        rows = [_row(e) for e in session.scalars(query)]
    if args.json:
        print(json.dumps({"exports": rows, "counts": counts(sessions)}, indent=2))
        return 0
    print(f"{'ID':>5}  {'STATE':8} {'TRIES':>5}  {'DESTINATION':24} SERIES / LAST ERROR")
    for r in rows:
        print(
            f"{r['id']:>5}  {r['state']:8} {r['attempts']:>5}  {r['destination'][:24]:24} "
            f"{r['source_series_uid']}"
        )
        if r["last_error"] and r["state"] != ExportState.DONE.value:
            print(f"{'':46}{r['last_error'][:120]}")
    c = counts(sessions)
    print(", ".join(f"{k}: {v}" for k, v in c.items()))
    return 0


COMMANDS = {"export": (HELP, DESCRIPTION, add_arguments, run)}


# --- from an analysed series to queued exports ------------------------------------------------


@dataclass(frozen=True)
class ExportConfig:
    """What the worker needs to turn an analysis into queued exports."""

    destinations: tuple[Destination, ...]
    outputs_dir: Path
    policy: ExportPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> ExportConfig:
        return cls(
            destinations=destinations_from_settings(settings),
            outputs_dir=settings.home / "outputs",
            policy=ExportPolicy.from_settings(settings),
        )


def _calling_aet(sessions: sessionmaker[Session], series_uid: str) -> str:
    from dicom_node.db import Instance

    with sessions() as session:
        aet = session.scalar(
            select(Instance.calling_aet)
            .where(Instance.series_instance_uid == series_uid)
            .order_by(Instance.id)
            .limit(1)
        )
    return str(aet or "")


def export_results(
    sessions: sessionmaker[Session],
    config: ExportConfig | None,
    *,
    analysis: Any,
    dwi: Any,
    datasets: Sequence[Any],
    segs: Sequence[Any] = (),
) -> list[int]:
    """Write an analysed series' DICOM objects and queue them for its destinations.

    Does nothing without a destination serving the series' calling AE. Never raises: the
    results API already has the numbers, and a failure here is logged, not a failed job.
    """
    if config is None or not config.destinations:
        return []
    series_uid = str(dwi.series_instance_uid)
    calling = _calling_aet(sessions, series_uid)
    targets = [d for d in config.destinations if d.serves(calling)]
    if not targets:
        return []
    try:
        from dicom_node.analysis.outputs import build_outputs

        objects = build_outputs(analysis, dwi, datasets, segs=segs)
        for problem in objects.problems:
            log.warning("result objects", extra={"series_uid": series_uid, "problem": problem})
        folder = config.outputs_dir / str(dwi.study_instance_uid) / series_uid
        paths = objects.write(folder)
        ids = schedule(
            sessions,
            destinations=targets,
            paths=paths,
            batch_key=str(objects.sr.SOPInstanceUID),
            study_uid=str(dwi.study_instance_uid),
            source_series_uid=series_uid,
            calling_aet=calling,
        )
    except Exception:
        log.exception(
            "result objects could not be written or queued", extra={"series_uid": series_uid}
        )
        return []
    try:  # the SR a later assessment revises (descriptors, likelihood: assessment_sync)
        from dicom_node.jobs.assessment_sync import record_original  # it imports this module

        record_original(
            sessions,
            series_uid=series_uid,
            pipeline_version=str(analysis.pipeline_version),
            sr=objects.sr,
            path=paths[0],
        )
    except Exception:  # the objects are queued all the same; only a revision is lost
        log.exception("result SR not recorded", extra={"series_uid": series_uid})
    return ids
