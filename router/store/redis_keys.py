"""Every Redis key the store uses, in one place, under one prefix.

The prefix comes from the store URL (`redis://:pw@host:6379/0?prefix=sr`,
default `support-router`), so several desks, or the tests, can share one
Redis without seeing each other's data. Scripts build the per-record keys
from the prefix they are handed, which ties this store to one Redis server
(no Redis Cluster): all of a desk's keys live together anyway.

Under the prefix P (the layouts are described where the Lua is):

    P:m:<id>            hash     a message                   (redis_lua_queue)
    P:in:<rank>         stream   inbound queue per urgency   (redis_lua_queue)
    P:out:<channel>:ready|later|own:<consumer>   outbox      (redis_lua_outbox)
    P:outlog:<channel>  zset     outbound by seq, pull mode
    P:c:<id>            hash     a conversation              (redis_lua_records)
    P:cm:<id>           zset     its messages by time
    P:ix:<status>[:t:<team>][:a:<assignee>]  zset  inbox order (redis_lua_records)
    P:thread P:ref P:inkey P:outkey          hash  lookups
    P:acks:<channel>:<recipient>             zset  acks by time, per-sender cap
    P:seq P:dlseq P:counters                 counters (refs, round robin)
    P:dl                hash     dead letters
    P:agents P:agent_token P:tokens P:presence   hash  agents
    P:lease:<name> P:lease_tokens            leases
    P:checkpoints       hash     channels' read positions
    P:sleep:in|out      zset     claims waiting for work
    P:events P:wake     pub/sub channels
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from router.errors import ConfigError

DEFAULT_PREFIX = "support-router"
GROUP = "workers"
"""The consumer group every daemon's pipeline workers share."""

RANKS = range(4)
"""One inbound stream per urgency rank: critical (0) is read before high (1),
normal (2) and low or untriaged (3), so a backlog never delays a critical one."""

_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SEP = "\x1f"
"""Joins a channel name and a channel's own id in hash fields: neither holds it."""


@dataclass(frozen=True)
class Keys:
    prefix: str

    def message(self, message_id: str) -> str:
        return f"{self.prefix}:m:{message_id}"

    def conversation(self, conversation_id: str) -> str:
        return f"{self.prefix}:c:{conversation_id}"

    def inbound(self, rank: int) -> str:
        return f"{self.prefix}:in:{rank}"

    def status_index(self, status: str, team: str | None, assignee: str | None) -> str:
        """The sorted set for one filter combination (see redis_scripts.INDEX)."""
        key = f"{self.prefix}:ix:{status}"
        if team is not None:
            key += f":t:{team}"
        if assignee is not None:
            key += f":a:{assignee}"
        return key

    def conversation_messages(self, conversation_id: str) -> str:
        return f"{self.prefix}:cm:{conversation_id}"

    def outlog(self, channel: str) -> str:
        return f"{self.prefix}:outlog:{channel}"

    @property
    def streams(self) -> list[str]:
        return [self.inbound(rank) for rank in RANKS]

    @property
    def events(self) -> str:
        """Pub/sub channel of Store.publish: reaches every process."""
        return f"{self.prefix}:events"

    @property
    def wake(self) -> str:
        """Pub/sub channel that wakes blocked claims (`in` or `out`)."""
        return f"{self.prefix}:wake"

    @property
    def sleepers_in(self) -> str:
        return f"{self.prefix}:sleep:in"

    @property
    def sleepers_out(self) -> str:
        return f"{self.prefix}:sleep:out"

    @property
    def inbound_keys(self) -> str:
        return f"{self.prefix}:inkey"

    @property
    def outbound_keys(self) -> str:
        return f"{self.prefix}:outkey"

    @property
    def refs(self) -> str:
        return f"{self.prefix}:ref"

    @property
    def counters(self) -> str:
        return f"{self.prefix}:counters"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}:dl"

    @property
    def agents(self) -> str:
        return f"{self.prefix}:agents"

    @property
    def agent_tokens(self) -> str:
        """name -> token hash; `tokens` is the reverse, for O(1) logins."""
        return f"{self.prefix}:agent_token"

    @property
    def tokens(self) -> str:
        return f"{self.prefix}:tokens"

    @property
    def presence(self) -> str:
        return f"{self.prefix}:presence"

    def lease(self, name: str) -> str:
        return f"{self.prefix}:lease:{name}"

    @property
    def lease_tokens(self) -> str:
        """Last fencing token per lease; never expires, so tokens only grow."""
        return f"{self.prefix}:lease_tokens"

    @property
    def checkpoints(self) -> str:
        """Channel checkpoints (IMAP UIDVALIDITY:last UID), one hash field each."""
        return f"{self.prefix}:checkpoints"


def split_url(url: str) -> tuple[str, str]:
    """(the URL redis-py connects to, the key prefix): `prefix` is ours, not
    a connection option, so it is taken out of the query."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((value for key, value in query if key == "prefix"), DEFAULT_PREFIX)
    if not _PREFIX.match(prefix):
        raise ConfigError([f"store.url: prefix {prefix!r} must be 1-64 of A-Z a-z 0-9 _ . -"])
    rest = urlencode([(key, value) for key, value in query if key != "prefix"])
    return urlunsplit(parts._replace(query=rest)), prefix
