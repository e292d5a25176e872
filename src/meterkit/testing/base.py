"""What every conformance suite stands on: the store under test, fresh or reopened."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from meterkit import engine, integrals
from meterkit.engine import timeweighted
from meterkit.engine.aggregate import Rows
from meterkit.models import Event, MeterSpec, UsageQuery
from meterkit.stores.base import Store
from meterkit.testing.support import SUITE_METERS, StoreFactory, assert_rows_match

__all__ = ["Conformance"]


class Conformance:
    """Implement :meth:`make_store`; set ``persistent = False`` for a store that keeps
    nothing once closed (the tests about reopening then skip)."""

    persistent: ClassVar[bool] = True
    meters: ClassVar[tuple[MeterSpec, ...]] = SUITE_METERS

    def make_store(self, location: Path) -> Store:
        """Open the store whose data lives at ``location`` (an existing directory)."""
        raise NotImplementedError("a StoreConformance subclass must implement make_store()")

    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> Iterator[StoreFactory]:
        factory = StoreFactory(self.make_store, tmp_path, self.meters)
        try:
            yield factory
        finally:
            factory.close_all()

    @pytest.fixture
    def store(self, store_factory: StoreFactory) -> Store:
        return store_factory.open()

    def require_persistence(self) -> None:
        if not self.persistent:
            pytest.skip("this store keeps nothing across reopening")

    def check_query(
        self,
        store: Store,
        spec: MeterSpec,
        query: UsageQuery,
        appended: Sequence[Event],
        context: str,
    ) -> Rows:
        """The engine's answer over ``appended``, checked against the store's scan and (where
        it has one) its native aggregate or its time-weighted integrals."""
        want = engine.aggregate(spec, query, appended)
        if timeweighted.names(spec):
            # What the window's events cannot tell alone: the values carried into it.
            got = integrals.time_weighted_rows(store, spec, query)
            assert_rows_match(got, want, spec, f"{context}, time-weighted")
            return want
        scanned = list(
            store.scan(spec.name, query.organization_id, query.scan_start, query.page_end)
        )
        assert_rows_match(engine.aggregate(spec, query, scanned), want, spec, f"{context}, scan")
        native = store.aggregate(spec, query)
        if native is not None:
            assert_rows_match(native, want, spec, f"{context}, native aggregate")
        return want
