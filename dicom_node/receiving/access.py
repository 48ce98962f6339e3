"""Who may associate: called AE check and an allow-list of calling AE titles with source hosts.

Refusals use the standard A-ASSOCIATE-RJ codes (PS3.8 9.3.4, Table 9-21): result
rejected-permanent, source DICOM UL service-user, reason "calling AE title not recognised" (3)
or "called AE title not recognised" (7). A known AE title calling from a host that is not
listed for it is, to the standard, an unrecognised calling AE: reason 3.

Past the per-calling-AE or per-host association limit (:class:`AssociationLimits`) a request is
refused as pynetdicom refuses one past the total limit: rejected-transient, source DICOM UL
service-provider (presentation related function), reason "local-limit-exceeded" (2), so one
peer cannot hold every slot and the refused sender knows to retry later.

Allow-list entries (``HER2LOW_NODE_ALLOWED_CALLING_AETS``, a JSON list):

- ``"ORTHANC"``: this AE title from any host;
- ``"ORTHANC@10.0.0.5"``, ``"ORTHANC@10.0.0.0/24"``, ``"ORTHANC@fd00::/64"``: from that address
  or network;
- ``"ORTHANC@pacs.example.org"``: from the addresses the name resolves to when the node starts
  (a name that does not resolve matches nothing: the check fails closed).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from her2low.core.settings import ConfigurationError

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str], list[str]]


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result (PS3.8 Table 9-21)."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source (PS3.8 Table 9-21)."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the source is the service-user (PS3.8 Table 9-21)."""

    NO_REASON_GIVEN = 0x01
    APPLICATION_CONTEXT_NOT_SUPPORTED = 0x02
    CALLING_AE_TITLE_NOT_RECOGNIZED = 0x03
    CALLED_AE_TITLE_NOT_RECOGNIZED = 0x07


class ProviderRejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the source is the service-provider's presentation
    related function (PS3.8 Table 9-21)."""

    TEMPORARY_CONGESTION = 0x01
    LOCAL_LIMIT_EXCEEDED = 0x02


def resolve_host(name: str) -> list[str]:
    """Addresses of a host name (IPv4 and IPv6); empty when it does not resolve."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return []
    return sorted({str(info[4][0]) for info in infos})


def _normalise(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # an IPv4 peer on a dual-stack socket
    return ip


@dataclass(frozen=True)
class AllowEntry:
    """One calling AE title and the networks it may call from (``None``: any host)."""

    ae_title: str
    networks: tuple[Network, ...] | None = None
    source: str = ""

    @classmethod
    def parse(cls, text: str, resolve: Resolver = resolve_host) -> AllowEntry:
        """Parse ``AET`` or ``AET@host-or-ip-or-cidr``; raises :class:`ConfigurationError`."""
        aet, sep, host = text.partition("@")
        aet = aet.strip()
        if not aet or len(aet) > 16 or "\\" in aet or not aet.isascii():
            raise ConfigurationError(
                f"HER2LOW_NODE_ALLOWED_CALLING_AETS: {text!r} is not a valid AE title "
                "(1-16 ASCII characters, no backslash)"
            )
        if not sep:
            return cls(aet, None, text)
        host = host.strip()
        if not host:
            raise ConfigurationError(
                f"HER2LOW_NODE_ALLOWED_CALLING_AETS: {text!r} names no host after '@'"
            )
        try:
            return cls(aet, (ipaddress.ip_network(host, strict=False),), text)
        except ValueError:
            pass
        if "/" in host:
            raise ConfigurationError(
                f"HER2LOW_NODE_ALLOWED_CALLING_AETS: {text!r} is not a valid network"
            )
        addresses = resolve(host)
        if not addresses:
            log.warning(
                "allow-list host does not resolve; entry matches nothing", extra={"entry": text}
            )
        return cls(aet, tuple(ipaddress.ip_network(a) for a in addresses), text)

    def admits(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        if self.networks is None:
            return True
        ip = _normalise(address)
        return ip is not None and any(ip in net for net in self.networks)


@dataclass(frozen=True)
class AccessPolicy:
    """The node's association acceptance rules (an empty allow-list admits any calling AE)."""

    called_ae_title: str
    allowed: tuple[AllowEntry, ...] = ()

    @classmethod
    def from_entries(
        cls, called_ae_title: str, entries: Iterable[str], resolve: Resolver = resolve_host
    ) -> AccessPolicy:
        return cls(called_ae_title, tuple(AllowEntry.parse(e, resolve) for e in entries))

    @property
    def ae_titles(self) -> list[str]:
        return sorted({e.ae_title for e in self.allowed})

    def check(self, calling: str, called: str, address: str) -> RejectReason | None:
        """``None`` to accept, else the reason to reject with (called AE checked first)."""
        if called.strip() != self.called_ae_title.strip():
            return RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED
        if self.allowed and not any(e.admits(calling, address) for e in self.allowed):
            return RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED
        return None


@dataclass(frozen=True)
class AssociationLimits:
    """Concurrent associations one calling AE title, and one peer address, may hold."""

    per_calling_aet: int
    per_host: int

    def exceeded(self, calling: str, address: str, others: Iterable[tuple[str, str]]) -> str:
        """'' when a new association from ``calling`` at ``address`` fits beside ``others``
        (calling AE title, address of each association already held), else the limit's name."""
        calling = calling.strip()
        host = _normalise(address) or address
        same_aet = same_host = 0
        for other_aet, other_address in others:
            same_aet += other_aet.strip() == calling
            same_host += (_normalise(other_address) or other_address) == host
        if same_aet >= self.per_calling_aet:
            return "node_max_associations_per_aet"
        if same_host >= self.per_host:
            return "node_max_associations_per_host"
        return ""


def describe(entries: Sequence[AllowEntry]) -> list[str]:
    """The entries as configured, for start-up logs."""
    return [e.source or e.ae_title for e in entries]
