"""The one result type every recipe checker returns (math, code, multiple choice)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verdict:
    """correct: the sample is accepted; reason: one human-readable line saying why (kept in the output
    file so a rejection can be audited); extracted: the answer the checker read from the response (the
    boxed expression, the letter, the code block); details: checker-specific facts (tests passed, limits,
    sandbox isolation in force)."""

    correct: bool
    reason: str
    extracted: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"correct": self.correct, "reason": self.reason, "extracted": self.extracted,
                "details": self.details}
