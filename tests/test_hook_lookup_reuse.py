"""A hook call reuses this process's lookup of the patient only while nothing has changed.

Over real HTTP against the service: a repeated call runs no lookup query; a change made by
another writer (another instance, a tool, plain SQL that no application code sees) shows in the
very next call, and the call that found its reused lookup outdated wrote nothing before it
answered again. Plus the cache's own rules (newest generation only, bounded).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import func, select, text
from test_cds_support import (
    MASS_DESCRIPTORS,
    Service,
    hook_body,
    patient_resource,
    result_payload,
    running_service,
    start_service,
    stop_service,
)

from cds_service.orm import AuditEvent, UsedJti
from cds_service.store import HookLookup, HookRow, Store
from cds_service.store.lookup_cache import HookLookupCache
from her2low.core.database import make_engine


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    yield from running_service(tmp_path)


@pytest.fixture
def lookups(service: Service, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every lookup query the service runs (``Store.hook_rows`` calls)."""
    calls: list[object] = []
    store: Store = service.app.extensions["her2low_cds"].store
    original = store.hook_rows

    def counted(*args: Any, **kwargs: Any) -> HookLookup:
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(store, "hook_rows", counted)
    return calls


BODY = hook_body(prefetch={"patient": patient_resource(), "her2": None})


def _scored_case(service: Service) -> str:
    published = service.publish(result_payload())
    assert published.status_code == 201, published.text
    result_id = str(published.json()["result_id"])
    assert service.put_descriptors(result_id, MASS_DESCRIPTORS).status_code == 200
    return result_id


def _cards(response: requests.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    return list(response.json()["cards"])


def _count(service: Service, what: Any, *where: Any) -> int:
    engine = service.app.extensions["her2low_cds"].engine
    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(what).where(*where)) or 0)


def _outside_sql(service: Service, statement: str) -> None:
    """A write by another process's engine: no application code of this service sees it."""
    engine = make_engine(service.settings.cds_database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def test_a_repeated_call_reuses_the_lookup_and_audits_each_call(
    service: Service, lookups: list[object]
) -> None:
    _scored_case(service)
    first = _cards(service.post_hook(BODY))
    second = _cards(service.post_hook(BODY))
    assert len(first) == 1 and second == first
    assert len(lookups) == 1  # the second call ran no lookup query
    shown = AuditEvent.__table__.c.action == "card-shown"
    assert _count(service, AuditEvent.__table__, shown) == 2
    assert _count(service, UsedJti.__table__) == 2


def test_a_change_by_another_writer_shows_in_the_next_call(
    service: Service, lookups: list[object]
) -> None:
    _scored_case(service)
    assert len(_cards(service.post_hook(BODY))) == 1
    _outside_sql(service, "UPDATE predictions SET observation_status = 'entered-in-error'")
    assert _cards(service.post_hook(BODY)) == []  # withdrawn: no card, at once
    assert len(lookups) == 2  # the reused lookup was found outdated and read again
    shown = AuditEvent.__table__.c.action == "card-shown"
    assert _count(service, AuditEvent.__table__, shown) == 1  # the outdated answer left no trace
    assert _count(service, UsedJti.__table__) == 2  # and its token was recorded once
    assert _cards(service.post_hook(BODY)) == []
    assert len(lookups) == 2  # the fresh lookup is reused in turn


def test_a_patient_without_results_sees_a_new_result_at_once(
    service: Service, lookups: list[object]
) -> None:
    assert _cards(service.post_hook(BODY)) == []
    assert _cards(service.post_hook(BODY)) == []
    assert len(lookups) == 1  # "nothing for this patient" is reused too
    _scored_case(service)
    assert len(_cards(service.post_hook(BODY))) == 1
    assert len(lookups) == 2


def test_a_replayed_token_is_refused_on_a_reused_lookup(service: Service) -> None:
    _scored_case(service)
    assert len(_cards(service.post_hook(BODY))) == 1
    headers = service.auth()
    url = service.url + "/cds-services/her2low-mri"
    assert requests.post(url, json=BODY, headers=headers, timeout=10).status_code == 200
    replay = requests.post(url, json=BODY, headers=headers, timeout=10)
    assert replay.status_code == 401
    shown = AuditEvent.__table__.c.action == "card-shown"
    assert _count(service, AuditEvent.__table__, shown) == 2


def test_a_lost_generation_row_turns_reuse_off_not_the_service(
    service: Service, lookups: list[object]
) -> None:
    _scored_case(service)
    assert len(_cards(service.post_hook(BODY))) == 1
    _outside_sql(service, "DELETE FROM hook_generation")
    assert len(_cards(service.post_hook(BODY))) == 1  # answered from a fresh lookup
    assert len(_cards(service.post_hook(BODY))) == 1
    assert len(lookups) == 3  # nothing reused without a generation to check


def test_reuse_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``HER2LOW_CDS_HOOK_LOOKUP_CACHE_SIZE=0``: every call reads, and no generation is read."""
    service = start_service(tmp_path, cds_hook_lookup_cache_size=0)
    try:
        store: Store = service.app.extensions["her2low_cds"].store
        seen: list[bool] = []
        original = store.hook_rows

        def counted(*args: Any, generation: bool = True, **kwargs: Any) -> HookLookup:
            seen.append(generation)
            return original(*args, generation=generation, **kwargs)

        monkeypatch.setattr(store, "hook_rows", counted)
        _scored_case(service)
        assert len(_cards(service.post_hook(BODY))) == 1
        assert len(_cards(service.post_hook(BODY))) == 1
        assert seen == [False, False]
    finally:
        stop_service(service)


# --- the cache's rules -----------------------------------------------------------------------


def _lookup(generation: int | None, tag: str = "r") -> HookLookup:
    return HookLookup(
        generation, [HookRow(tag, "HOSP", tag, None, None, None, None, None, None, None)]
    )  # type: ignore[arg-type]


KEYS = (("HOSP", "MRN-1"),)
OTHER = (("HOSP", "MRN-2"),)


def test_the_cache_keeps_lookups_of_one_generation() -> None:
    cache = HookLookupCache()
    cache.put(KEYS, _lookup(5))
    assert cache.get(KEYS) == _lookup(5)
    cache.put(OTHER, _lookup(6, "o"))  # a newer generation drops every older lookup
    assert cache.get(KEYS) is None and cache.get(OTHER) == _lookup(6, "o")
    cache.put(KEYS, _lookup(3))  # an older one (a slow thread, or a restored database) too
    assert cache.get(OTHER) is None and cache.get(KEYS) == _lookup(3)
    cache.put(OTHER, _lookup(None))  # no generation to check it by: never kept
    assert cache.get(OTHER) is None


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    cache = HookLookupCache(capacity=2)
    cache.put((("H", "1"),), _lookup(1, "1"))
    cache.put((("H", "2"),), _lookup(1, "2"))
    assert cache.get((("H", "1"),)) is not None  # now the most recently used
    cache.put((("H", "3"),), _lookup(1, "3"))
    assert len(cache) == 2
    assert cache.get((("H", "2"),)) is None
    assert cache.get((("H", "1"),)) is not None and cache.get((("H", "3"),)) is not None
