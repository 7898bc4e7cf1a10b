"""Every refusal the core can give, each with the protocol's stable error code."""

from __future__ import annotations

from typing import Any, ClassVar


class DomainError(Exception):
    """A command was refused; nothing changes. ``code`` is the protocol's error code."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details


class InvalidMessage(DomainError):
    """A field breaks a rule the schema alone cannot express; ``details.path`` names it."""

    code = "invalid_message"


class Unauthorized(DomainError):
    """The actor's role may not send this message."""

    code = "unauthorized"


class VersionConflict(DomainError):
    """``expected_seq`` differs from the scope's current ``seq``."""

    code = "version_conflict"


class UnknownArea(DomainError):
    """The scope (bid year, area) does not exist."""

    code = "unknown_area"


class AreaExists(DomainError):
    """The scope already exists."""

    code = "area_exists"


class UnknownUser(DomainError):
    """No user with these initials in the scope."""

    code = "unknown_user"


class DuplicateInitials(DomainError):
    """The initials are already registered in an area of this bid year."""

    code = "duplicate_initials"


class RoundAlreadyOpen(DomainError):
    """A round is open already; only one may be open at a time."""

    code = "round_already_open"


class RoundOutOfOrder(DomainError):
    """Rounds open in order: the next round is the last round + 1."""

    code = "round_out_of_order"


class RoundNotOpen(DomainError):
    """The named round is not the open round."""

    code = "round_not_open"


class DayAlreadyHeld(DomainError):
    """The user already holds this day from a finalized round."""

    code = "day_already_held"


class DayFull(DomainError):
    """The day has reached the round's ``max_per_day``."""

    code = "day_full"


class NoBid(DomainError):
    """The user has no bid in the round."""

    code = "no_bid"


class InvalidRollbackTarget(DomainError):
    """The rollback target is not an earlier event of this scope."""

    code = "invalid_rollback_target"


class RollbackConflict(DomainError):
    """Restored initials are now registered in another area of the bid year."""

    code = "rollback_conflict"


class NotFound(DomainError):
    """The scope had no event by the queried point."""

    code = "not_found"


class IntegrityError(DomainError):
    """The hash chain or a snapshot does not check out; ``details.event_id`` is the first bad."""

    code = "integrity_error"


class PersistenceFailed(DomainError):
    """The commit failed: nothing of the transaction was stored; safe to retry."""

    code = "persistence_failed"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message, retryable=True, **details)


class IdReused(DomainError):
    """The message id was already acknowledged for a different message body."""

    code = "id_reused"
