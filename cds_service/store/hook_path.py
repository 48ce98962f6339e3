"""The patient-view call's statements, run on the pooled connection's DBAPI cursor.

Every hook call runs a lookup and a jti + audit write. Through ``Connection.execute`` each
statement paid about 0.1-0.2 ms of Python around well under 0.1 ms of database work; over the
call's statements that was about as much as all our other per-call work apart from the JWT
signature. So the
statements are still built with SQLAlchemy Core, but compiled once per dialect into a
:class:`DriverStatement` (SQL text, parameter order, the column types' own bind and result
processors) and executed on the cursor of the call's pooled connection. The rest of the store
keeps the ORM and Core.

The write can be conditional on ``hook_generation.n`` (migration 0006): a call that reused a
cached lookup records its jti only if the counter is still the one read with that lookup, in
the same statement; otherwise nothing is written and the call answers again from a fresh one.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Insert,
    Select,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    union_all,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from cds_service.store.tables import AUDIT, GENERATION, JTI, PREDICTIONS, RESULTS
from cds_service.store.values import HookLookup, HookRow, UsedToken

AUDIT_COLUMNS = ("at", "actor", "action", "result_id", "detail")
_Processor = Callable[[Any], Any]


@dataclass(frozen=True)
class DriverStatement:
    """A Core statement compiled for one dialect, with what SQLAlchemy would do to its values."""

    sql: str
    order: tuple[str, ...] | None  # positional paramstyles (SQLite's qmark): bind names in order
    binds: Mapping[str, _Processor]
    results: tuple[_Processor | None, ...]
    literals: Mapping[str, Any]  # values given in the statement itself (``id = 1``)

    @classmethod
    def compile(cls, statement: ClauseElement, dialect: Dialect) -> DriverStatement:
        compiled = statement.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        binds: dict[str, _Processor] = {}
        literals: dict[str, Any] = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                binds[name] = processor
            if not bind.required:
                literals[name] = bind.value
        results: tuple[_Processor | None, ...] = ()
        if isinstance(statement, Select):
            results = tuple(
                column.type.dialect_impl(dialect).result_processor(dialect, None)
                for column in statement.selected_columns
            )
        order = (
            tuple(compiled.positiontup) if compiled.positional and compiled.positiontup else None
        )
        return cls(compiled.string, order, binds, results, literals)

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """The driver's parameters: processed values, in order for a positional paramstyle."""
        if self.literals:
            values = {**self.literals, **values}
        binds = self.binds
        if self.order is not None:
            return tuple(
                binds[name](values[name]) if name in binds else values[name] for name in self.order
            )
        return {
            name: (binds[name](value) if name in binds else value) for name, value in values.items()
        }

    def row(self, raw: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(
            value if processor is None else processor(value)
            for processor, value in zip(self.results, raw, strict=True)
        )


class HookConnection:
    """One hook call's pooled DBAPI connection; autocommit on PostgreSQL until it is closed.

    Checked out without a SQLAlchemy ``Connection`` around it (the hot path runs only driver
    statements); SQLAlchemy's dialect sets and resets the isolation level, and ``close`` hands
    it back to the pool, which rolls back anything left open.
    """

    def __init__(self, engine: Engine) -> None:
        self.dialect = engine.dialect
        self.autocommit = self.dialect.name == "postgresql"
        self._pooled: PoolProxiedConnection = engine.raw_connection()
        self.dbapi: Any = self._pooled.dbapi_connection
        assert self.dbapi is not None  # a fresh checkout is connected
        if self.autocommit:
            self.dialect.set_isolation_level(self.dbapi, "AUTOCOMMIT")

    def close(self) -> None:
        try:
            if self.autocommit:
                self.dialect.reset_isolation_level(self.dbapi)
        finally:
            self._pooled.close()


class Recorded(enum.Enum):
    """How a call's jti + audit write ended."""

    RECORDED = "recorded"
    REPLAYED = "replayed"  # the jti was seen before: nothing written
    STALE = "stale"  # the reused lookup's generation changed: nothing written


GENERATION_NOW = select(GENERATION.c.n).where(GENERATION.c.id == 1).scalar_subquery()


def _lookup(pairs: int) -> Select[Any]:
    """Results of ``pairs`` (issuer, PatientID) keys with their latest prediction's key.

    Bind parameters ``i0, v0, i1, v1 …``.
    """
    r, p = RESULTS, PREDICTIONS
    latest = select(func.max(p.c.id)).where(p.c.result_id == r.c.id).correlate(r).scalar_subquery()
    keys = or_(
        *(
            and_(r.c.patient_issuer == bindparam(f"i{k}"), r.c.patient_id == bindparam(f"v{k}"))
            for k in range(pairs)
        )
    )
    return (
        select(
            r.c.id,
            r.c.patient_issuer,
            r.c.patient_id,
            r.c.review_flag,
            r.c.acquired_at,
            r.c.laterality,
            p.c.id,
            p.c.observation_status,
            p.c.card_uuid,
            p.c.computed_at,
        )
        .select_from(r.outerjoin(p, p.c.id == latest))
        .where(keys)
        .order_by(r.c.acquired_at.desc(), r.c.updated_at.desc())
        .limit(50)
    )


def _jti_insert(conditional: bool) -> Insert:
    """The jti insert; ``conditional``: only while ``hook_generation.n`` = ``:generation``."""
    source = select(
        bindparam("iss", type_=JTI.c.iss.type),
        bindparam("jti", type_=JTI.c.jti.type),
        bindparam("exp", type_=JTI.c.exp.type),
    )
    if conditional:
        source = source.where(bindparam("generation", type_=BigInteger()) == GENERATION_NOW)
    return insert(JTI).from_select(["iss", "jti", "exp"], source)


def _audit_binds(k: int) -> list[Any]:
    return [bindparam(f"{c}{k}", type_=AUDIT.c[c].type) for c in AUDIT_COLUMNS]


def _one_statement(events: int, conditional: bool) -> Insert:
    """PostgreSQL: the jti insert and ``events`` audit rows as ONE statement (no BEGIN/COMMIT).

    The audit rows are selected from the jti insert's RETURNING, and a statement is atomic on
    its own: a replayed jti fails the whole statement on the unique key, and a stale generation
    inserts no jti, hence no audit row; the returned rows say which.
    """
    used = _jti_insert(conditional).returning(JTI.c.jti)
    if not events:
        return used
    cte = used.cte("used_jti")
    rows = [select(*_audit_binds(k)).select_from(cte) for k in range(events)]
    source = rows[0] if len(rows) == 1 else union_all(*rows)
    return insert(AUDIT).from_select(list(AUDIT_COLUMNS), source).returning(AUDIT.c.id)


class HookStatements:
    """The compiled hot-path statements of one engine's dialect, and how to run them."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.integrity_error: type[Exception] = dialect.loaded_dbapi.IntegrityError
        self.generation = DriverStatement.compile(select(GENERATION_NOW), dialect)
        self.audit = DriverStatement.compile(
            insert(AUDIT).values(dict(zip(AUDIT_COLUMNS, _audit_binds(0), strict=True))), dialect
        )

    @functools.lru_cache(maxsize=8)  # noqa: B019 - one instance per engine, lives as long
    def lookup_statement(self, pairs: int) -> DriverStatement:
        return DriverStatement.compile(_lookup(pairs), self.dialect)

    @functools.lru_cache(maxsize=8)  # noqa: B019
    def jti_statement(self, conditional: bool) -> DriverStatement:
        return DriverStatement.compile(_jti_insert(conditional), self.dialect)

    @functools.lru_cache(maxsize=8)  # noqa: B019
    def one_statement(self, events: int, conditional: bool) -> DriverStatement:
        return DriverStatement.compile(_one_statement(events, conditional), self.dialect)

    def lookup(
        self, dbapi: Any, keys: Iterable[tuple[str, str]], *, generation: bool = True
    ) -> HookLookup:
        """The generation, then the rows (so rows are never older than the generation).

        ``generation=False``: the rows only (a lookup nobody will reuse).
        """
        pairs = list(keys)
        cursor = dbapi.cursor()
        try:
            current = None
            if generation:
                cursor.execute(self.generation.sql, self.generation.parameters({}))
                found = cursor.fetchone()
                current = None if found is None or found[0] is None else int(found[0])
            if not pairs:
                return HookLookup(current, [])
            statement = self.lookup_statement(len(pairs))
            values: dict[str, str] = {}
            for k, (issuer, value) in enumerate(pairs):
                values[f"i{k}"] = issuer
                values[f"v{k}"] = value
            cursor.execute(statement.sql, statement.parameters(values))
            rows = [HookRow(*statement.row(raw)) for raw in cursor.fetchall()]
        finally:
            cursor.close()
        return HookLookup(current, rows)

    def record(
        self,
        dbapi: Any,
        token: UsedToken,
        rows: Sequence[Mapping[str, Any]],
        generation: int | None,
        *,
        autocommit: bool,
    ) -> Recorded:
        """The jti and the audit rows, atomically; ``dbapi`` is committed or rolled back here.

        ``autocommit`` (PostgreSQL's hook connection): one statement. Otherwise (SQLite, behind
        the caller's write gate): the jti insert, the audit rows, a commit.
        """
        values: dict[str, Any] = {"iss": token.iss, "jti": token.jti, "exp": token.expires}
        conditional = generation is not None
        if conditional:
            values["generation"] = generation
        cursor = dbapi.cursor()
        try:
            if autocommit:
                statement = self.one_statement(len(rows), conditional)
                for k, row in enumerate(rows):
                    values.update({f"{c}{k}": row[c] for c in AUDIT_COLUMNS})
                try:
                    cursor.execute(statement.sql, statement.parameters(values))
                except self.integrity_error:
                    return Recorded.REPLAYED
                if conditional and not cursor.fetchall():
                    return Recorded.STALE
                return Recorded.RECORDED
            statement = self.jti_statement(conditional)
            try:
                cursor.execute(statement.sql, statement.parameters(values))
            except self.integrity_error:
                dbapi.rollback()
                return Recorded.REPLAYED
            if conditional and cursor.rowcount == 0:
                dbapi.rollback()
                return Recorded.STALE
            if rows:
                cursor.executemany(
                    self.audit.sql,
                    [
                        self.audit.parameters({f"{c}0": row[c] for c in AUDIT_COLUMNS})
                        for row in rows
                    ],
                )
            dbapi.commit()
            return Recorded.RECORDED
        except BaseException:
            if not autocommit:
                dbapi.rollback()
            raise
        finally:
            cursor.close()
