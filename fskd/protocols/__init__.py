"""Evaluation protocols: one file per protocol (episodic, all-way, base-to-new, transfer), each
owning its sampling, its validation rows, how it scores a head and how it describes itself.

Each protocol is declared here (name, module, description, what it allows); its module loads on
first use, so the declarations (``--protocol`` choices, config validation) import no torch.
``fskd.config`` reads the names from here: this file imports only :mod:`fskd.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fskd.registry import Registry

if TYPE_CHECKING:
    from fskd.protocols.base import Protocol

#: name -> Protocol subclass; declared in the order ``--protocol`` lists them (the default first)
PROTOCOLS: Registry[type[Protocol]] = Registry("protocol")

PROTOCOLS.lazy(
    "episodic",
    "fskd.protocols.episodic",
    help="N-way K-shot episodes of a class split (novel by default); mean and 95% CI over episodes",
)
PROTOCOLS.lazy(
    "allway",
    "fskd.protocols.allway",
    aliases=("all-way",),
    transductive=True,
    help="CLIP few-shot: K shots per class from the train split, all classes, the full test split; seeds",
)
PROTOCOLS.lazy(
    "base-to-new",
    "fskd.protocols.base_to_new",
    transductive=True,
    help="CoCoOp: fitted on the base half of the classes; base, new and their harmonic mean",
)
PROTOCOLS.lazy(
    "cross-dataset",
    "fskd.protocols.transfer",
    other_store=True,
    help="a state fitted on one store scores another store's classes through their class text",
)
PROTOCOLS.lazy(
    "domain-shift",
    "fskd.protocols.transfer",
    other_store=True,
    help="a state fitted on one store scores another store of the same classes, mapped by key",
)


def protocol_names() -> tuple[str, ...]:
    """Every protocol, in declaration order (episodic, the default of ``fskd eval``, first)."""
    return tuple(PROTOCOLS.declared())


def protocol_choices() -> list[str]:
    """``--protocol`` choices: every name followed by its aliases (``all-way`` for ``allway``)."""
    return [c for n in protocol_names() for c in (n, *PROTOCOLS.meta(n, "aliases", ()))]


def transductive_protocols() -> tuple[str, ...]:
    """The protocols whose test rows ``--transductive`` (TransCLIP) may classify jointly."""
    return tuple(n for n in protocol_names() if PROTOCOLS.meta(n, "transductive", False))


def other_store_protocols() -> tuple[str, ...]:
    """The protocols that score a state on another store than the one it was fitted on."""
    return tuple(n for n in protocol_names() if PROTOCOLS.meta(n, "other_store", False))


__all__ = ["PROTOCOLS", "protocol_names", "protocol_choices", "transductive_protocols", "other_store_protocols"]
