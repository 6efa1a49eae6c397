"""Hub storage in Redis Streams: several hub processes serve the same streams.

``RedisStorage.from_url("redis://127.0.0.1:6379/0", prefix="sk")`` (or
``unix:///path/redis.sock``) keeps a hub's streams in Redis, so any number of
hub processes on one Redis serve the same streams, and a hub process that dies
loses nothing. It needs redis-py: ``pip install "streamkit[redis]"``; this
module imports it only when a :class:`RedisStorage` is made, so ``import
streamkit.hub`` never does.

Layout (:func:`stream_keys`): per stream, four keys sharing one hash tag
``{<prefix>:<first 32 hex digits of sha256(name)>}`` (so a stream's keys sit
in one Redis Cluster slot, whatever characters its name holds):

- ``...:meta``, a hash: ``name``, ``created``, ``finished``, ``next_offset``,
  ``size_bytes``, and ``ttl``, ``expires_ms``, ``content_type`` when set;
- ``...:log``, a Redis stream with one entry per appended batch, its ID
  ``0-<offset of its first record + 1>`` (so Redis itself refuses a second
  write at an offset), fields ``r`` (the records, packed as in a hub records
  body), ``t`` (the batch's lineage tag) and, for a producer's batch, ``p``,
  ``e``, ``s`` (producer id, epoch, sequence);
- ``...:producers``, a hash: producer id -> ``"epoch seq first count"``;
- ``...:tags``, a Redis stream with an entry of the same ID for each entry
  of the log, holding its tag alone (``t``): the lineage of a record is
  looked up there, not in a log entry that may be megabytes to load.

Every request that writes is one Lua script that checks everything before its
first write, so a refused request changes nothing, and requests of several hub
processes are atomic with respect to each other. The idempotent producer's
rule (:func:`~streamkit.hub.storage.decide_produce`) is mirrored in the produce
script, epochs and sequence numbers compared as decimal strings (Lua numbers
are doubles: 2**63 - 1 and 2**63 - 2 would be equal). A stream's TTL is
Redis's own expiry of its keys. After each change a script publishes
``"<origin> <name>"`` on the deployment's channel (:func:`changes_channel`),
the origin a random tag of the storage that made it: one subscription per hub
process wakes its live readers for the changes other hubs made (a hub wakes
its own at once). A lost notification costs a live reader at most
``recheck_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import re
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from streamkit._redis import import_redis
from streamkit.hub.protocol import Records, quote
from streamkit.hub.storage import (
    Batch,
    HubError,
    LimitExceeded,
    Limits,
    Produced,
    ProducerState,
    StorageUnavailable,
    StreamExists,
    StreamFinished,
    StreamInfo,
    StreamNotFound,
    check_batch,
    check_new_stream,
    decide_produce,
    new_tag,
)
from streamkit.session import Backoff

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.commands.core import AsyncScript

__all__ = ["RedisStorage", "StreamKeys", "changes_channel", "check_prefix", "stream_keys"]

logger = logging.getLogger("streamkit.hub")

#: The oldest Redis that runs the scripts (``#!lua`` flags: refused whole when out of memory).
MIN_REDIS_VERSION = (7, 0)
#: An argument of a script.
_Arg = bytes | str | int

#: Hex digits of a name's SHA-256 in its keys (128 bits: no two names collide in practice).
_NAME_DIGITS = 32


class StreamKeys(NamedTuple):
    """The Redis keys of one stream (see the module docstring)."""

    meta: str
    log: str
    producers: str
    tags: str


def stream_keys(prefix: str, name: str) -> StreamKeys:
    """The keys of stream ``name`` in deployment ``prefix``, sharing one hash tag."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:_NAME_DIGITS]
    tag = f"{{{prefix}:{digest}}}"
    return StreamKeys(f"{tag}:meta", f"{tag}:log", f"{tag}:producers", f"{tag}:tags")


def changes_channel(prefix: str) -> str:
    """The pub/sub channel on which deployment ``prefix`` announces changed streams."""
    return f"{prefix}:changes"


def check_prefix(prefix: object) -> str:
    """A deployment's key prefix: 1..100 characters, no braces (they delimit hash tags)."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
    if not 1 <= len(prefix) <= 100 or "{" in prefix or "}" in prefix:
        raise ValueError(f"prefix must be 1..100 characters without braces, not {prefix!r}")
    return prefix


# -- the scripts ------------------------------------------------------------------
#
# Each takes KEYS = meta, log, producers, tags. A script with the plain "#!lua" line
# is refused whole, before it runs, when Redis is out of memory (maxmemory):
# a request then changes nothing. Replies are arrays whose first element says
# what happened. Numbers cross as strings: Lua numbers are doubles.

_LUA_COMMON = """
local function dec(n) return string.format('%.0f', n) end
local function meta_fields(key) return redis.call('HGETALL', key) end
"""

# The start of an append: the stream's state (m) and the batch's size (count).
_APPEND_HEAD = """
local m = redis.call('HMGET', KEYS[1], 'next_offset', 'finished', 'expires_ms')
if not m[1] then return {'not_found'} end
local first, count = m[1], tonumber(ARGV[2])
"""

# ARGV: name, ttl ('' for none), content type ('' for none), channel, notice.
_CREATE = (
    "#!lua\n"
    + _LUA_COMMON
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
local now = redis.call('TIME')
local created = now[1] .. '.' .. string.format('%06d', tonumber(now[2]))
local fields = {'name', ARGV[1], 'created', created, 'finished', '0',
                'next_offset', '0', 'size_bytes', '0'}
local expires = nil
if ARGV[2] ~= '' then
  table.insert(fields, 'ttl'); table.insert(fields, ARGV[2])
  local at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
          + math.ceil(tonumber(ARGV[2]) * 1000)
  -- a TTL past year 100,000 never comes: no expiry then (PEXPIREAT would overflow)
  if at < 3e15 then
    expires = dec(at)
    table.insert(fields, 'expires_ms'); table.insert(fields, expires)
  end
end
if ARGV[3] ~= '' then
  table.insert(fields, 'content_type'); table.insert(fields, ARGV[3])
end
redis.call('HSET', KEYS[1], unpack(fields))
if expires then redis.call('PEXPIREAT', KEYS[1], expires) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {'ok', meta_fields(KEYS[1])}
"""
)

# ARGV: records (packed), count, size, tag, channel, notice, then for a produce:
# producer id, epoch, seq (canonical decimal strings).
_APPEND_BODY = """
if count > 0 then
  local id = '0-' .. dec(tonumber(first) + 1)
  if producer then
    redis.call('XADD', KEYS[2], id, 'r', ARGV[1], 't', ARGV[4],
               'p', ARGV[7], 'e', ARGV[8], 's', ARGV[9])
  else
    redis.call('XADD', KEYS[2], id, 'r', ARGV[1], 't', ARGV[4])
  end
  redis.call('XADD', KEYS[4], id, 't', ARGV[4])
  redis.call('HINCRBY', KEYS[1], 'next_offset', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'size_bytes', ARGV[3])
  if m[3] then
    redis.call('PEXPIREAT', KEYS[2], m[3])
    redis.call('PEXPIREAT', KEYS[4], m[3])
  end
end
if producer then
  redis.call('HSET', KEYS[3], ARGV[7], ARGV[8] .. ' ' .. ARGV[9] .. ' ' .. first .. ' ' .. ARGV[2])
  if m[3] then redis.call('PEXPIREAT', KEYS[3], m[3]) end
end
if count > 0 then redis.call('PUBLISH', ARGV[5], ARGV[6]) end
return {'ok', first}
"""

_APPEND = (
    "#!lua\n"
    + _LUA_COMMON
    + _APPEND_HEAD
    + """
if m[2] == '1' then return {'finished'} end
local producer = false
"""
    + _APPEND_BODY
)

# decide_produce, mirrored: epochs and seqs are canonical decimal strings
# (no leading zeros), compared by length, then digit by digit.
_PRODUCE = (
    "#!lua\n"
    + _LUA_COMMON
    + _APPEND_HEAD
    + """
local function cmp(a, b)
  if #a ~= #b then return #a < #b and -1 or 1 end
  if a == b then return 0 end
  return a < b and -1 or 1
end
local function incr(s)  -- s + 1, in decimal
  local i = #s
  while i > 0 and string.sub(s, i, i) == '9' do i = i - 1 end
  if i == 0 then return '1' .. string.rep('0', #s) end
  local digit = string.char(string.byte(s, i) + 1)
  return string.sub(s, 1, i - 1) .. digit .. string.rep('0', #s - i)
end
local epoch, seq = ARGV[8], ARGV[9]
local state = redis.call('HGET', KEYS[3], ARGV[7])
if state then
  local se, ss = string.match(state, '^(%d+) (%d+) ')
  local c = cmp(epoch, se)
  if c < 0 then return {'fenced', state} end
  if c == 0 then
    if cmp(seq, ss) <= 0 then return {'duplicate', state} end
    if seq ~= incr(ss) then return {'gap', state} end
  elseif seq ~= '0' then return {'gap', state} end
elseif seq ~= '0' then return {'gap', ''} end
if m[2] == '1' then return {'finished'} end
local producer = true
"""
    + _APPEND_BODY
)

# ARGV: offset, max_records, max_bytes. Returns {meta} or {meta, tag, body, ...}:
# each body the records taken from one entry, packed as in a hub records body.
# Record lengths are unpacked many at a time (one struct.unpack per record
# would cost more than the rest of a read).
_READ = (
    "#!lua flags=no-writes\n"
    + _LUA_COMMON
    + """
local CHUNK = 200
local CHUNK_FORMAT = '>' .. string.rep('I4', CHUNK)
-- the lengths of records first..first+n-1 (from 0) of a body, as a table
local function lengths(body, first, n)
  local format = n == CHUNK and CHUNK_FORMAT or '>' .. string.rep('I4', n)
  return {struct.unpack(format, body, 5 + 4 * first)}
end
local meta = meta_fields(KEYS[1])
if #meta == 0 then return {} end
local next_offset = tonumber(redis.call('HGET', KEYS[1], 'next_offset'))
local pos = tonumber(ARGV[1])
local records_left, bytes_left, taken = tonumber(ARGV[2]), tonumber(ARGV[3]), 0
local out = {meta}
if pos >= next_offset or records_left <= 0 then return out end
local entries = redis.call('XREVRANGE', KEYS[2], '0-' .. dec(pos + 1), '-', 'COUNT', 1)
while #entries > 0 do
  for _, entry in ipairs(entries) do
    local first = tonumber(string.sub(entry[1], 3)) - 1
    local fields = entry[2]
    local body, tag
    for i = 1, #fields, 2 do
      if fields[i] == 'r' then body = fields[i + 1]
      elseif fields[i] == 't' then tag = fields[i + 1] end
    end
    local count = struct.unpack('>I4', body)
    local skip = pos - first
    local data = 5 + 4 * count  -- where the records begin (Lua counts from 1)
    local n, size = 0, 0
    if skip == 0 and count <= records_left and #body - data + 1 <= bytes_left then
      n, size = count, #body - data + 1  -- the whole entry
    else
      local i = 0
      while i < skip do  -- skip the records before pos
        local k = math.min(CHUNK, skip - i)
        local chunk = lengths(body, i, k)
        for j = 1, k do data = data + chunk[j] end
        i = i + k
      end
      local full = false
      while not full and skip + n < count and n < records_left do
        local k = math.min(CHUNK, count - skip - n, records_left - n)
        local chunk = lengths(body, skip + n, k)
        for j = 1, k do
          if taken + n > 0 and size + chunk[j] > bytes_left then full = true; break end
          n, size = n + 1, size + chunk[j]
        end
      end
    end
    if n == 0 then return out end
    table.insert(out, tag)
    if n == count then
      table.insert(out, body)
    else
      table.insert(out, struct.pack('>I4', n)
        .. string.sub(body, 5 + 4 * skip, 4 + 4 * (skip + n))
        .. string.sub(body, data, data + size - 1))
    end
    taken, pos = taken + n, pos + n
    records_left, bytes_left = records_left - n, bytes_left - size
    -- (no byte left is no reason to stop: empty records may follow)
    if skip + n < count or records_left <= 0 or pos >= next_offset then
      return out
    end
  end
  -- as many entries as are likely to fit, guessing from the last one's size
  local last = entries[#entries]
  local guess = math.ceil(bytes_left / math.max(1, #last[2][2])) + 1
  local wanted = math.max(1, math.min(records_left, guess, 64))
  entries = redis.call('XRANGE', KEYS[2], '(' .. last[1], '+', 'COUNT', wanted)
end
return out
"""
)

# ARGV: offset. {} if the stream is absent, else {the lineage tag of the
# batch holding record ``offset``, or false if there is no such record}.
_TAG_AT = (
    "#!lua flags=no-writes\n"
    + _LUA_COMMON
    + """
local next_offset = redis.call('HGET', KEYS[1], 'next_offset')
if not next_offset then return {} end
local offset = tonumber(ARGV[1])
if offset < 0 or offset >= tonumber(next_offset) then return {false} end
-- the tags stream, not the log: a log entry may be megabytes to load
local entries = redis.call('XREVRANGE', KEYS[4], '0-' .. dec(offset + 1), '-', 'COUNT', 1)
if #entries == 0 then return {false} end
return {entries[1][2][2]}
"""
)

# ARGV: producer id. {} if the stream is absent, else {state or false}.
_PRODUCER = (
    "#!lua flags=no-writes\n"
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
return {redis.call('HGET', KEYS[3], ARGV[1])}
"""
)

# ARGV: channel, notice. Finish and delete run even when Redis is out of memory
# (allow-oom): they free memory, or let readers end.
_FINISH = (
    "#!lua flags=allow-oom\n"
    + _LUA_COMMON
    + """
local finished = redis.call('HGET', KEYS[1], 'finished')
if not finished then return {'not_found'} end
if finished ~= '1' then
  redis.call('HSET', KEYS[1], 'finished', '1')
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return {'ok', meta_fields(KEYS[1])}
"""
)

_DELETE = """#!lua flags=allow-oom
if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found'} end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return {'ok'}
"""

#: Redis error replies that mean "not now" (a busy script, a failing disk, ...).
_UNAVAILABLE = ("BUSY", "MISCONF", "CLUSTERDOWN")


def _redis() -> Any:
    """The ``redis`` package, or an ImportError naming the extra to install."""
    return import_redis("RedisStorage")


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A hash from a script's HGETALL reply (a flat list)."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _info(name: str, fields: dict[bytes, bytes]) -> StreamInfo:
    """A stream's metadata from its meta hash."""
    ttl = fields.get(b"ttl")
    content_type = fields.get(b"content_type")
    return StreamInfo(
        name,
        content_type=None if content_type is None else content_type.decode(),
        ttl=None if ttl is None else float(ttl),
        created=float(fields[b"created"]),
        finished=fields[b"finished"] == b"1",
        next_offset=int(fields[b"next_offset"]),
        size_bytes=int(fields[b"size_bytes"]),
    )


def _state(value: bytes) -> ProducerState:
    epoch, seq, first, count = value.split(b" ")
    return ProducerState(int(epoch), int(seq), int(first), int(count))


def _describe(url: str) -> str:
    """The Redis a URL names, for messages (without its password)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "unix":
        return f"Redis at {parts.path}"
    host = parts.hostname or "localhost"
    return f"Redis at {host}:{parts.port or 6379}"


@contextlib.asynccontextmanager
async def _deadline(seconds: float) -> AsyncIterator[None]:
    """``asyncio.timeout(seconds)`` around redis-py calls, which can swallow a cancellation.

    redis-py sends each command under ``asyncio.wait_for``, which on Python
    3.11 returns the send's result when the task is cancelled just as the
    send completes: the ``CancelledError`` is lost, though the task's
    ``cancelling()`` count stays raised. Left so, a ``close()`` that cancels
    the listener would never end it, and every later timeout of that task
    would turn the next cancellation into a ``TimeoutError`` its retries
    catch. Here a cancellation requested during the block that the block
    did not raise is raised when it ends (as this deadline's own
    ``TimeoutError`` if it was this deadline's).
    """
    task = asyncio.current_task()
    assert task is not None, "a deadline needs a task"
    cancels = task.cancelling()
    async with asyncio.timeout(seconds):
        try:
            yield
        except Exception as exc:
            if task.cancelling() > cancels:
                raise asyncio.CancelledError from exc
            raise
        if task.cancelling() > cancels:
            raise asyncio.CancelledError


class RedisStorage:
    """Hub storage in Redis Streams, shared by every hub process on one Redis.

    ``RedisStorage.from_url(url, prefix=...)`` with a ``redis://``,
    ``rediss://`` or ``unix://`` URL; then ``serve_hub(..., storage=...)``.
    Streams of one deployment ``prefix`` are the same streams for every hub
    using it; another prefix on the same Redis is a separate deployment.

    Guarantees and limits:

    - Every request is atomic across hub processes (one Lua script each);
      a refused request changes nothing.
    - Every Redis call is bounded by ``timeout`` seconds: Redis unreachable,
      silent, loading or read-only makes a request fail with
      :class:`StorageUnavailable` (``"unavailable"``) within about that time
      (a write that times out may or may not have been applied; an idempotent
      producer's retry sorts that out).
    - Redis's memory is the bound on what streams hold: ``start()`` refuses a
      Redis whose ``maxmemory-policy`` evicts keys (it would delete streams),
      and a Redis out of memory (``maxmemory`` with ``noeviction``) makes
      appends fail with :class:`LimitExceeded`. ``limits.max_record``,
      ``max_batch`` and ``max_name`` apply; ``max_streams`` and
      ``max_total_bytes`` are not counted (counting them would need one key that every stream's
      writes touch: a hot spot, not scriptable in Redis Cluster, and left
      stale by Redis's own expiry of streams).
    - ``recheck_interval``: a caught-up live reader looks again this often,
      so a lost notification costs a delay, never a record.

    ``RedisStorage(client, ...)`` takes a ``redis.asyncio.Redis`` client
    you made (for Sentinel, say; give it no retries of its own, or a write
    could be applied twice), which ``close()`` leaves open; ``where`` names
    it in messages. ``max_connections`` bounds the requests in flight.
    ``start()`` connects and checks Redis; ``close()`` stops listening for
    changes and closes the connections of a client made by :meth:`from_url`.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "streamkit",
        limits: Limits | None = None,
        timeout: float = 5.0,
        recheck_interval: float = 1.0,
        max_connections: int = 64,
        where: str = "Redis",
    ) -> None:
        self._redis = _redis()
        self.prefix = check_prefix(prefix)
        self.limits = limits or Limits()
        if not timeout > 0 or not recheck_interval > 0:
            raise ValueError(
                f"timeout and recheck_interval must be > 0, not {timeout}, {recheck_interval}"
            )
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, not {max_connections}")
        # Requests in flight at once, each on a connection of its own; waiting
        # for a turn counts against the request's timeout. (Ours, not a
        # blocking pool's: redis-py 5.0's held one lock while connecting.)
        self._turns = asyncio.Semaphore(max_connections)
        self.timeout = timeout
        self.recheck_interval: float | None = recheck_interval
        self.where = where
        self._client = client
        self._own_client = False  # from_url's: closed with the storage
        self._channel = changes_channel(prefix)
        # Notices name their origin, so this storage skips its own: the hub
        # already woke its readers for the changes it made.
        self._origin = new_tag()
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(source)
            for name, source in (
                ("create", _CREATE),
                ("append", _APPEND),
                ("produce", _PRODUCE),
                ("read", _READ),
                ("tag_at", _TAG_AT),
                ("producer", _PRODUCER),
                ("finish", _FINISH),
                ("delete", _DELETE),
            )
        }
        self._on_change: list[Callable[[str | None], None]] = []
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = False  # the listener's subscription was confirmed
        self._started = False
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "streamkit",
        limits: Limits | None = None,
        timeout: float = 5.0,
        recheck_interval: float = 1.0,
        max_connections: int = 64,
    ) -> RedisStorage:
        """Storage on the Redis at ``url`` (``redis://host:port/db``, ``unix:///path``).

        Connects in :meth:`start`, not here. ``max_connections`` bounds the
        requests in flight to Redis, each on a connection of its own (one
        more connection listens for changes); a request waits for its turn
        within its ``timeout``. Raises :class:`ImportError` naming the
        ``streamkit[redis]`` extra when redis-py is not installed.
        """
        redis = _redis()
        pool = redis.asyncio.ConnectionPool.from_url(
            url,
            max_connections=max_connections + 1,
            socket_connect_timeout=timeout,
            # A backstop: our own deadline (timeout) ends every call first.
            socket_timeout=2 * timeout,
            # No retries of our own requests: a write retried after its
            # reply was lost could be applied twice.
            retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
        client = redis.asyncio.Redis.from_pool(pool)
        storage = cls(
            client,
            prefix=prefix,
            limits=limits,
            timeout=timeout,
            recheck_interval=recheck_interval,
            max_connections=max_connections,
            where=_describe(url),
        )
        storage._own_client = True
        return storage

    def _notice(self, name: str) -> str:
        """What a change to stream ``name`` through this storage publishes."""
        return f"{self._origin} {name}"

    def _keys(self, name: str) -> StreamKeys:
        return stream_keys(self.prefix, name)

    def __repr__(self) -> str:
        return f"<RedisStorage {self.where} prefix={self.prefix!r}>"

    # -- calls to Redis, bounded ----------------------------------------------------

    async def _script(self, what: str, name: str, *args: _Arg) -> Any:
        """Run the script ``what`` on stream ``name``'s keys, with ``args``."""
        script = self._scripts[what]
        keys = self._keys(name)
        return await self._call(
            what, name, lambda: script(keys=keys, args=args, client=self._client)
        )

    async def _call(self, what: str, name: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """Make and await a call to Redis within ``timeout``; its failures become HubErrors."""
        errors = self._redis.exceptions
        try:
            async with _deadline(self.timeout), self._turns:
                return await call()
        except TimeoutError as exc:
            raise StorageUnavailable(
                f"{self.where} did not answer {what} of stream {quote(name)}"
                f" within {self.timeout} s"
            ) from exc
        except errors.ResponseError as exc:
            raise self._refused(what, name, exc) from exc
        except (errors.RedisError, OSError) as exc:
            raise StorageUnavailable(
                f"{self.where} is unavailable for {what} of stream {quote(name)}: {exc}"
            ) from exc

    def _refused(self, what: str, name: str, exc: Exception) -> HubError:
        errors = self._redis.exceptions
        message = str(exc)
        if isinstance(exc, errors.OutOfMemoryError):
            return LimitExceeded(
                f"{self.where} is out of memory (maxmemory): {what} of stream {quote(name)}"
                f" refused: {message}"
            )
        # redis-py strips the codes it has a class for (READONLY, ...); others stay.
        unavailable = (errors.ReadOnlyError, errors.TryAgainError, errors.MasterDownError)
        if isinstance(exc, unavailable) or message.startswith(_UNAVAILABLE):
            return StorageUnavailable(
                f"{self.where} cannot serve {what} of stream {quote(name)} now: {message}"
            )
        return HubError(f"{self.where} failed {what} of stream {quote(name)}: {message}")

    # -- the storage interface --------------------------------------------------------

    async def create(self, name: str, *, ttl: float | None, content_type: str | None) -> StreamInfo:
        """Create a stream; :class:`StreamExists` if it exists (and has not expired)."""
        ttl, content_type = check_new_stream(name, ttl, content_type, self.limits)
        reply = await self._script(
            "create",
            name,
            name,
            "" if ttl is None else repr(ttl),
            content_type or "",
            self._channel,
            self._notice(name),
        )
        if reply[0] == b"exists":
            raise StreamExists(f"stream {quote(name)} exists")
        return _info(name, _pairs(reply[1]))

    async def get(self, name: str) -> StreamInfo | None:
        """The stream's metadata, or ``None`` if it is absent (or expired)."""
        key = self._keys(name).meta
        meta = await self._call("status", name, lambda: self._client.hgetall(key))
        return _info(name, meta) if meta else None

    async def append(self, name: str, records: Sequence[bytes]) -> int:
        """Append ``records`` as one batch; return the offset of the first."""
        reply = await self._script("append", name, *self._batch(name, Records.pack(records)))
        return self._appended(name, reply)

    async def produce(
        self, name: str, records: Sequence[bytes], producer_id: str, epoch: int, seq: int
    ) -> Produced:
        """Decide and append an idempotent producer's batch in one step (one script)."""
        reply = await self._script(
            "produce",
            name,
            *self._batch(name, Records.pack(records)),
            producer_id,
            str(epoch),
            str(seq),
        )
        outcome = reply[0]
        if outcome in (b"fenced", b"duplicate", b"gap"):
            # The script did not append: decide_produce, on the state the
            # script saw, raises or answers exactly as every backend does.
            state = _state(reply[1]) if reply[1] else None
            produced = decide_produce(state, producer_id, epoch, seq)
            if produced is None or outcome != b"duplicate":
                raise HubError(
                    f"{self.where}'s produce script said {outcome.decode()} where"
                    f" decide_produce appends (producer {quote(producer_id)}, epoch {epoch},"
                    f" seq {seq}, state {state}): a bug"
                )
            return produced
        return Produced(self._appended(name, reply), False)

    def _batch(self, name: str, records: Records) -> tuple[_Arg, ...]:
        """The arguments of an append script for ``records``; past a limit raises."""
        check_batch(records, self.limits)
        notice = self._notice(name)
        return records.body, len(records), records.size, new_tag(), self._channel, notice

    @staticmethod
    def _appended(name: str, reply: list[Any]) -> int:
        outcome = reply[0]
        if outcome == b"not_found":
            raise StreamNotFound(f"no stream named {quote(name)}")
        if outcome == b"finished":
            raise StreamFinished(f"stream {quote(name)} is finished; no more appends")
        return int(reply[1])

    async def producer(self, name: str, producer_id: str) -> ProducerState | None:
        """What the stream remembers of ``producer_id`` (``None``: nothing)."""
        reply = await self._script("producer", name, producer_id)
        if not reply:
            raise StreamNotFound(f"no stream named {quote(name)}")
        return None if reply[0] is None else _state(reply[0])

    async def read(self, name: str, offset: int, max_records: int, max_bytes: int) -> Batch:
        """Records from ``offset`` (at least one if any exist), bounded by both limits."""
        reply = await self._script("read", name, offset, max_records, max_bytes)
        if not reply:
            raise StreamNotFound(f"no stream named {quote(name)}")
        info = _info(name, _pairs(reply[0]))
        if len(reply) == 1:
            return Batch(Records.pack(()), info, None)
        records = Records.join([Records.unpack(body) for body in reply[2::2]])
        return Batch(records, info, reply[-2].decode())

    async def tag_at(self, name: str, offset: int) -> str | None:
        """The lineage tag of the batch holding record ``offset`` (``None``: no such record).

        Raises :class:`StreamNotFound` if the stream is absent.
        """
        reply = await self._script("tag_at", name, offset)
        if not reply:
            raise StreamNotFound(f"no stream named {quote(name)}")
        return None if reply[0] is None else bytes(reply[0]).decode()

    async def finish(self, name: str) -> StreamInfo:
        """Mark the stream finished (idempotent); return its metadata."""
        reply = await self._script("finish", name, self._channel, self._notice(name))
        if reply[0] == b"not_found":
            raise StreamNotFound(f"no stream named {quote(name)}")
        return _info(name, _pairs(reply[1]))

    async def delete(self, name: str) -> None:
        """Delete the stream and everything it holds."""
        reply = await self._script("delete", name, self._channel, self._notice(name))
        if reply[0] == b"not_found":
            raise StreamNotFound(f"no stream named {quote(name)}")

    async def expire(self, now: float) -> list[str]:
        """Nothing to sweep: Redis expires a stream's keys itself."""
        return []

    # -- lifecycle and notifications ---------------------------------------------------

    def subscribe(self, on_change: Callable[[str | None], None]) -> None:
        """Call ``on_change(name)`` when stream ``name`` may have changed (through any hub).

        ``on_change(None)``: anything may have changed (after the
        notification channel was lost and subscribed again). One
        subscription per storage, however many callbacks. Raises
        :class:`HubError` once the storage is closed.
        """
        self._check_open()
        self._on_change.append(on_change)
        if self._started and self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    async def start(self) -> None:
        """Connect and check Redis: version 7 or later, and no eviction.

        Raises :class:`StorageUnavailable` if Redis cannot be reached within
        ``timeout``, and :class:`HubError` for a Redis that would lose
        streams (an evicting ``maxmemory-policy``) or is too old, or once
        the storage is closed.
        """
        self._check_open()
        errors = self._redis.exceptions
        try:
            async with _deadline(self.timeout):
                server = await self._client.info("server")
                memory = await self._client.info("memory")
        except (TimeoutError, errors.RedisError, OSError) as exc:
            raise StorageUnavailable(f"{self.where} is unavailable: {exc!r}") from exc
        version = str(server.get("redis_version", "0"))
        numbers = re.match(r"(\d+)\.(\d+)", version)
        if numbers is None or tuple(map(int, numbers.groups())) < MIN_REDIS_VERSION:
            raise HubError(
                f"{self.where} runs Redis {version}; RedisStorage needs Redis"
                f" {'.'.join(map(str, MIN_REDIS_VERSION))} or later"
            )
        policy = memory.get("maxmemory_policy", "noeviction")
        if policy != "noeviction":
            raise HubError(
                f"{self.where} has maxmemory-policy {policy}: it would evict (delete)"
                " streams when full; set maxmemory-policy noeviction"
            )
        if not memory.get("maxmemory"):
            logger.warning(
                "%s has no maxmemory: streams can grow until the machine runs out of memory"
                " (set maxmemory, with maxmemory-policy noeviction)",
                self.where,
            )
        self._started = True
        if self._on_change and self._listener is None:
            self._listener = asyncio.create_task(self._listen())

    async def close(self) -> None:
        """Stop listening for changes; close the connections of a client made by from_url.

        Returns within about twice ``timeout``, whatever Redis is doing (killed,
        restarting, silent).
        """
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        if self._own_client:
            with contextlib.suppress(TimeoutError, OSError, self._redis.exceptions.RedisError):
                async with _deadline(self.timeout):
                    await self._client.aclose()

    def _check_open(self) -> None:
        # A listener started now would run on, with nothing left to stop it.
        if self._closed:
            raise HubError(f"the RedisStorage of {self.where} is closed")

    def _changed(self, name: str | None) -> None:
        for on_change in self._on_change:
            try:
                on_change(name)
            except Exception:
                logger.exception("a hub storage change callback failed")

    async def _listen(self) -> None:
        """Subscribe to the changes channel, and again whenever the subscription is lost.

        The pauses between attempts back off, and start again from the
        shortest once a subscription was made. Live readers meanwhile look
        again every ``recheck_interval``.
        """
        errors = self._redis.exceptions
        backoff, rng = Backoff(initial=0.05, maximum=self.timeout), random.Random()
        delays = backoff.delays(rng)
        while True:
            self._subscribed = False
            try:
                await self._listen_once()
            except (TimeoutError, errors.RedisError, OSError) as exc:
                logger.warning("%s: lost the change notifications: %r", self.where, exc)
            except Exception:  # a bug must not end the notifications for good
                logger.exception("%s: the change notifications failed", self.where)
            if self._subscribed:
                delays = backoff.delays(rng)
            await asyncio.sleep(next(delays))

    async def _listen_once(self) -> None:
        """Hand on notifications until the subscription fails (or a ping goes unanswered)."""
        errors = self._redis.exceptions
        loop = asyncio.get_running_loop()
        pubsub = self._client.pubsub()
        try:
            async with _deadline(self.timeout):
                await pubsub.subscribe(self._channel)
            heard = loop.time()  # when Redis was last heard on this connection
            pinged = False
            while True:
                async with _deadline(2 * self.timeout):  # redis-py's timeout, bounded
                    message = await pubsub.get_message(timeout=self.timeout)
                if message is not None:
                    heard, pinged = loop.time(), False
                    if message["type"] == "message":
                        notice = bytes(message["data"]).decode(errors="replace")
                        origin, _, name = notice.partition(" ")
                        if origin != self._origin:
                            self._changed(name)
                    elif message["type"] == "subscribe":
                        # Subscribed now (not when SUBSCRIBE was sent): whatever
                        # changed before this went unheard.
                        self._subscribed = True
                        self._changed(None)
                    continue
                silent = loop.time() - heard
                if pinged and silent >= 2 * self.timeout:
                    raise TimeoutError(f"no answer to a ping in {self.timeout} s")
                if not pinged and silent >= self.timeout:
                    async with _deadline(self.timeout):
                        await pubsub.ping()
                    pinged = True
        finally:
            with contextlib.suppress(TimeoutError, OSError, errors.RedisError):
                async with _deadline(self.timeout):
                    await pubsub.aclose()
