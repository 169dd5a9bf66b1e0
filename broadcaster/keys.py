"""The Redis key layout (CONTRACT §6), in one place.

Every key of conversation C is ``P:{C}:<suffix>``: the braces are a Redis Cluster
hash tag, so all of one conversation's keys and its channel share one slot.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "bc"


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Names of the keys and channel of each conversation under ``prefix``."""

    prefix: str = DEFAULT_PREFIX

    def tag(self, conv: str) -> str:
        return f"{self.prefix}:{{{conv}}}"

    def live(self, conv: str) -> str:
        """Pub/sub channel the publish script fans out on."""
        return f"{self.prefix}:{{{conv}}}:live"

    def log(self, conv: str) -> str:
        """History stream; entry ids are ``<seq>-0``, field ``p`` holds the payload."""
        return f"{self.prefix}:{{{conv}}}:log"

    def meta(self, conv: str) -> str:
        """Hash with ``seq`` (last assigned) and ``epoch``."""
        return f"{self.prefix}:{{{conv}}}:meta"

    def state(self, conv: str) -> str:
        """Hash of state key -> payload of the latest event published with that key."""
        return f"{self.prefix}:{{{conv}}}:state"

    def state_order(self, conv: str) -> str:
        """Sorted set of state keys scored by the seq that last updated them (for the cap)."""
        return f"{self.prefix}:{{{conv}}}:state_order"

    def idempotency(self, conv: str, event_id: str) -> str:
        """String holding the seq first assigned to ``event_id``."""
        return f"{self.prefix}:{{{conv}}}:id:{event_id}"

    def batch(self, conv: str, batch_id: str) -> str:
        """String holding the seqs a publish batch got (answers a retry of that batch)."""
        return f"{self.prefix}:{{{conv}}}:batch:{batch_id}"

    def presence(self, conv: str) -> str:
        """Hash ``<gateway>|<profile>`` -> ``<count>|<expires at ms>``."""
        return f"{self.prefix}:{{{conv}}}:presence"

    def presence_users(self, conv: str) -> str:
        """Hash ``<gateway>|<user>`` -> ``<count>|<expires at ms>|<info JSON or empty>`` (presence_users_report.lua)."""
        return f"{self.prefix}:{{{conv}}}:presence_users"

    def presence_announced(self, conv: str) -> str:
        """Hash user -> ``0`` (its join was announced, it is present) or the ms it has been absent since."""
        return f"{self.prefix}:{{{conv}}}:presence_announced"

    def presence_leaving(self, conv: str) -> str:
        """Sorted set of announced users now absent, scored by the ms their leave is due."""
        return f"{self.prefix}:{{{conv}}}:presence_leaving"

    def presence_gateways(self, conv: str) -> str:
        """Hash gateway id -> ms its last user report expires (the gateways a user may still be on)."""
        return f"{self.prefix}:{{{conv}}}:presence_gateways"

    def presence_sweep(self, conv: str) -> str:
        """String: the HSCAN cursor of the sweep of :meth:`presence_users` (expired fields)."""
        return f"{self.prefix}:{{{conv}}}:presence_sweep"

    def conv_of_channel(self, channel: str) -> str | None:
        """The conversation id of a live channel name, or None if it is not one of ours."""
        head = f"{self.prefix}:{{"
        if channel.startswith(head) and channel.endswith("}:live"):
            return channel[len(head) : -len("}:live")]
        return None

    def control(self) -> str:
        """Pub/sub channel of the control messages (``broadcaster.control``): every process of the prefix.

        No hash tag: it is no conversation's (a conversation's keys all hold ``{``); on a
        cluster it is a sharded channel of its own slot.
        """
        return f"{self.prefix}:control"

    def revoked(self) -> str:
        """Hash of the deny list: subject (``sub``) -> until (ms since the epoch); pruned on read."""
        return f"{self.prefix}:revoked"
