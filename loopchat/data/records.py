"""Neutral in-memory records that every file format is read into and written from.

A conversation is a tree (as in OpenAssistant): each node has a parent, and alternative
replies to the same parent are siblings. A plain chat is a tree with one branch; a
preference pair is a prompt chain with two sibling assistant replies plus a ranking.
The store persists exactly these shapes, so readers and writers never touch SQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass
class Node:
    id: str  # local id, unique within its ConversationRecord
    parent: str | None  # local id of the parent node, None for a root
    role: str  # one of ROLES
    content: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class RankingRecord:
    """An ordering of sibling nodes, best first. Nodes in one group are tied."""

    groups: list[list[str]]  # local node ids
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConversationRecord:
    nodes: list[Node]
    rankings: list[RankingRecord] = field(default_factory=list)
    source: str = "import"  # e.g. "messages", "hh-rlhf", "oasst", "ultrafeedback", "chat"
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"category": "false_premise"}

    def validate(self) -> None:
        """Raise ValueError naming what is wrong; used by every reader before import."""
        ids = set()
        for n in self.nodes:
            if n.id in ids:
                raise ValueError(f"duplicate node id {n.id!r}")
            if n.role not in ROLES:
                raise ValueError(f"node {n.id!r}: role must be one of {ROLES}, got {n.role!r}")
            if not isinstance(n.content, str):
                raise ValueError(f"node {n.id!r}: content must be a string, got {type(n.content).__name__}")
            ids.add(n.id)
        for n in self.nodes:
            if n.parent is not None and n.parent not in ids:
                raise ValueError(f"node {n.id!r}: unknown parent {n.parent!r}")
        parents = {n.id: n.parent for n in self.nodes}
        for r in self.rankings:
            flat = [i for g in r.groups for i in g]
            if len(flat) < 2:
                raise ValueError("a ranking needs at least two messages")
            if len(set(flat)) != len(flat):
                raise ValueError("a ranking lists the same message twice")
            for i in flat:
                if i not in ids:
                    raise ValueError(f"ranking names unknown node {i!r}")
            if len({parents[i] for i in flat}) != 1:
                raise ValueError("a ranking must order sibling messages (same parent)")
