"""The asset registry: what each organization stores, and how big it is.

Storage recalculation (:meth:`meterkit.Meter.recalculate_storage`) replaces the counted
``storage_bytes`` with the truth. The truth comes from a ``meterkit_stored_assets`` plugin
when one answers for the organization, and otherwise from this registry, which the
application keeps up to date as assets are written and removed (``put`` / ``delete``, in
Python or over HTTP). Each asset is one store record of the kind ``assets/<organization>``,
keyed by the asset's name, so every process sharing the store sees the same registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from meterkit.errors import StateConflict, ValidationError
from meterkit.validate import MAX_VALUE, check_id

if TYPE_CHECKING:
    from meterkit.stores.base import Store

__all__ = ["Asset", "delete_asset", "list_assets", "put_asset", "stored_sizes"]


@attrs.frozen
class Asset:
    """One stored asset of an organization: its name (``resource``), size and last change."""

    organization_id: str
    resource: str
    bytes: int
    updated_at: int

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


def _kind(organization_id: str) -> str:
    return f"assets/{organization_id}"


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VALUE:
        raise ValidationError("bytes", f"must be a whole number of bytes from 0 to {MAX_VALUE}")
    return value


def put_asset(
    store: Store, organization_id: object, resource: object, size: object, now: int
) -> Asset:
    """Record (or resize) an asset; everything is checked before the store is touched."""
    org = check_id("organization_id", organization_id)
    name = check_id("resource", resource)
    asset = Asset(org, name, _size(size), now)
    others = sum(v for k, v in stored_sizes(store, org).items() if k != name)
    if others + asset.bytes > MAX_VALUE:
        # Storage is counted as their sum: it must stay a number a counter holds exactly.
        raise StateConflict(
            "bytes", f"the organization's assets would hold more than {MAX_VALUE} bytes in all"
        )
    store.put_record(_kind(org), name, {"bytes": asset.bytes, "updated_at": now})
    return asset


def delete_asset(store: Store, organization_id: object, resource: object) -> bool:
    """Forget an asset; ``True`` if it was registered."""
    org = check_id("organization_id", organization_id)
    return store.delete_record(_kind(org), check_id("resource", resource))


def list_assets(store: Store, organization_id: object) -> list[Asset]:
    """The organization's registered assets, by name."""
    org = check_id("organization_id", organization_id)
    return [
        Asset(org, name, int(data.get("bytes", 0)), int(data.get("updated_at", 0)))
        for name, data in store.list_records(_kind(org))
    ]


def stored_sizes(store: Store, organization_id: str) -> dict[str, int]:
    """``{resource: bytes}`` of the registry, as the stored-assets hook answers."""
    return {a.resource: a.bytes for a in list_assets(store, organization_id)}
