"""The Redis store: every state change is one Lua script, so several service processes stay consistent.

Keys of queue ``q`` (prefix ``cqs:{q}:``, one hash slot per queue):

    seq              last index handed out (INCR)
    body   HASH      index -> the item's DataFrameProto without its index
    all    ZSET      index (score index): every live item, for get/truncate/first entry
    ready  ZSET      index, score index (priority items: index - 2^50, so they sort first)
    prio   SET       indexes of priority items
    pend   ZSET      index, score = lease deadline (ms)
    owner  HASH      index -> consumer
    pc:<consumer> ZSET  that consumer's pending indexes
    sess   HASH      consumer -> live session id
    rid    HASH      index -> requestId;  byrid HASH requestId -> index
    waitby SET       tokens of the processes whose watchers wait for a change
    dk:<key>         "<index> LF <requestId>" of a ``put_once`` key, expiring after its TTL
    done   ZSET      requestIds of removed items, score = when they are forgotten (ms; ``lookup``)
    doneidx HASH     requestId -> the removed item's index

A claim that drains the queue adds this process's token to ``waitby``; the
next change (put, removal, release) clears it and PUBLISHes the queue name on
``cqs:changes`` once if a process other than the writer waits (the writer wakes
its own waiters without Redis), so watchers in every process wake at once
while a busy queue, or a queue served by one process, costs no pub/sub
traffic. Pending items whose deadline passed are made ready again inside the
claim script. A batch of puts also runs, in the same script, a claim for each
waiting watcher of this process (``store.Handoff``), so a waiting watcher gets a new item
after one round trip. ``put_and_remove`` (a worker's result put + input commit) is the
one script that spans two queues, i.e. two hash tags: atomic on the single
Redis this store runs on, not meant for Redis Cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from .settings import DEFAULT_REDIS_CALL_TIMEOUT_S
from .store import (
    COMMITTED_MAX,
    COMMITTED_TTL_S,
    IDEMPOTENCY_TTL_S,
    TAG_SCAN_LIMIT,
    HandedClaim,
    HandoffStore,
    Item,
    Position,
    PutOnce,
    PutRequest,
    QueueFull,
    QueueStats,
    Seen,
    StoreUnavailable,
    Superseded,
    Taker,
    Whereabouts,
)

log = logging.getLogger("comfyserve.queue.redis")
T = TypeVar("T")
CHANNEL = "cqs:changes"
CALL_TIMEOUT_S = DEFAULT_REDIS_CALL_TIMEOUT_S
LISTENER_STOP_S = 2.0  # how long close() waits for the change listener to stop
_UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError,
                OSError)

_LIB = """
local BIG = 1125899906842624
local function int(x) return string.format('%d', x) end
local function score_of(P, i)
  if redis.call('SISMEMBER', P..'prio', i) == 1 then return tonumber(i) - BIG end
  return tonumber(i)
end
local function unown(P, i)
  local o = redis.call('HGET', P..'owner', i)
  if o then
    redis.call('HDEL', P..'owner', i)
    redis.call('ZREM', P..'pc:'..o, i)
  end
  redis.call('ZREM', P..'pend', i)
end
local function requeue(P, i)
  unown(P, i)
  redis.call('ZADD', P..'ready', score_of(P, i), i)
end
-- A claim that drained the queue leaves a 'waitby' mark (the waiting processes' tokens); the next
-- change clears it and publishes once if a process other than the writer (ORIGIN) waits: the writer
-- wakes its own watchers without Redis, so a busy queue costs no pub/sub traffic and an idle watcher
-- in any process still wakes at once.
local function wake(P, channel, queue)
  local waiting = redis.call('SMEMBERS', P..'waitby')
  if #waiting == 0 then return end
  redis.call('DEL', P..'waitby')
  for _, w in ipairs(waiting) do
    if w ~= ORIGIN then
      redis.call('PUBLISH', channel, queue)
      return
    end
  end
end
-- Protobuf reading for watch tags: an item body is DataFrameProto fields 2-4, tags = field 2 entries.
local function varint(s, pos)
  local value, mult = 0, 1
  while true do
    local b = string.byte(s, pos)
    if b == nil then return nil, pos end
    pos = pos + 1
    value = value + (b % 128) * mult
    if b < 128 then return value, pos end
    mult = mult * 128
  end
end
local function fields(s)
  local out, pos = {}, 1
  while pos <= #s do
    local key
    key, pos = varint(s, pos)
    if key == nil then break end
    local wire = key % 8
    if wire == 2 then
      local len
      len, pos = varint(s, pos)
      if len == nil then break end
      out[#out + 1] = {math.floor(key / 8), string.sub(s, pos, pos + len - 1)}
      pos = pos + len
    elseif wire == 0 then
      local _
      _, pos = varint(s, pos)
    else
      break
    end
  end
  return out
end
local function has_tags(body, wanted)
  if not body then return false end
  local tags = {}
  for _, f in ipairs(fields(body)) do
    if f[1] == 2 then
      local k, v = '', ''
      for _, e in ipairs(fields(f[2])) do
        if e[1] == 1 then k = e[2] elseif e[1] == 2 then v = e[2] end
      end
      tags[k] = v
    end
  end
  for _, kv in ipairs(wanted) do
    if tags[kv[1]] ~= kv[2] then return false end
  end
  return true
end
-- A command over a list of arguments, in chunks (Lua's unpack has a limit); step: arguments per member.
local function chunked(cmd, key, args, step)
  local size = 1000 * step
  for k = 1, #args, size do
    redis.call(cmd, key, unpack(args, k, math.min(#args, k + size - 1)))
  end
end
-- A removed item's requestId is remembered for DONE_TTL_MS, at most DONE_MAX per queue (the oldest go first):
-- remember_many() per list of removed items, then forget_old() once per queue at the end of the script.
local NOW_MS = nil  -- the server's clock, read once per script
local REMEMBERED = {}  -- prefix -> requestIds remembered by this script
local function remember_many(P, rids, ids)
  if DONE_TTL_MS <= 0 or DONE_MAX <= 0 or #rids == 0 then return end
  if NOW_MS == nil then
    local t = redis.call('TIME')
    NOW_MS = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  local scored, indexed, forget_at = {}, {}, int(NOW_MS + DONE_TTL_MS)
  for k, rid in ipairs(rids) do
    scored[#scored + 1] = forget_at
    scored[#scored + 1] = rid
    indexed[#indexed + 1] = rid
    indexed[#indexed + 1] = ids[k]
  end
  chunked('ZADD', P..'done', scored, 2)
  chunked('HSET', P..'doneidx', indexed, 2)
  REMEMBERED[P] = (REMEMBERED[P] or 0) + #rids
end
local function forget_old(P)
  local n = REMEMBERED[P]
  if not n then return end
  REMEMBERED[P] = nil
  local D = P..'done'
  local gone = redis.call('ZRANGEBYSCORE', D, '-inf', NOW_MS, 'LIMIT', 0, 64 * n)
  local over = redis.call('ZCARD', D) - #gone - DONE_MAX
  if over > 0 then
    for _, r in ipairs(redis.call('ZRANGE', D, #gone, #gone + over - 1)) do gone[#gone + 1] = r end
  end
  if #gone > 0 then
    redis.call('ZREM', D, unpack(gone))
    redis.call('HDEL', P..'doneidx', unpack(gone))
  end
end
-- Drop items for good, a few Redis calls per list of items rather than a dozen per item; returns how many
-- existed. ids: index strings, each once.
local function drop_unique(P, ids)
  if #ids == 0 then return 0 end
  local live, rids = {}, {}
  for k = 1, #ids, 1000 do
    local chunk = {unpack(ids, k, math.min(#ids, k + 999))}
    local found = redis.call('HMGET', P..'rid', unpack(chunk))  -- every live item has one (insert)
    for n, i in ipairs(chunk) do
      if found[n] then live[#live + 1] = i; rids[#rids + 1] = found[n] end
    end
  end
  if #live == 0 then return 0 end
  local gone, owned = {}, {}
  for k = 1, #live, 1000 do
    local last = math.min(#live, k + 999)
    local chunk = {unpack(live, k, last)}
    local newest = redis.call('HMGET', P..'byrid', unpack(rids, k, last))
    local owners = redis.call('HMGET', P..'owner', unpack(chunk))
    for n, i in ipairs(chunk) do
      if newest[n] == i then gone[#gone + 1] = rids[k + n - 1] end
      local o = owners[n]
      if o then
        if not owned[o] then owned[o] = {} end
        owned[o][#owned[o] + 1] = i
      end
    end
  end
  chunked('HDEL', P..'body', live, 1)
  chunked('HDEL', P..'rid', live, 1)
  if #gone > 0 then chunked('HDEL', P..'byrid', gone, 1) end
  remember_many(P, rids, live)
  chunked('ZREM', P..'all', live, 1)
  chunked('ZREM', P..'ready', live, 1)
  chunked('SREM', P..'prio', live, 1)
  chunked('ZREM', P..'pend', live, 1)
  for o, mine in pairs(owned) do
    chunked('HDEL', P..'owner', mine, 1)
    chunked('ZREM', P..'pc:'..o, mine, 1)
  end
  return #live
end
-- drop_unique for a list that may name an item more than once.
local function drop_many(P, ids)
  local seen, unique = {}, {}
  for _, i in ipairs(ids) do
    if not seen[i] then seen[i] = true; unique[#unique + 1] = i end
  end
  return drop_unique(P, unique)
end
local function insert(P, prio, rid, body)
  local idx = redis.call('INCR', P..'seq')
  local i = tostring(idx)
  redis.call('HSET', P..'body', i, body)
  redis.call('HSET', P..'rid', i, rid)
  redis.call('HSET', P..'byrid', rid, i)
  redis.call('ZADD', P..'all', idx, i)
  if prio == '1' then
    redis.call('SADD', P..'prio', i)
    redis.call('ZADD', P..'ready', idx - BIG, i)
  else
    redis.call('ZADD', P..'ready', idx, i)
  end
  return idx
end
-- insert for a list of puts {prio, rid, body}, in order, with a few Redis calls in all; returns their indexes.
local function insert_many(P, puts)
  local idxs = {}
  if #puts == 0 then return idxs end
  local first = redis.call('INCRBY', P..'seq', #puts) - #puts + 1
  local bodies, rids, byrid, all, ready, prio = {}, {}, {}, {}, {}, {}
  for k, put in ipairs(puts) do
    local idx = first + k - 1
    local i = int(idx)
    idxs[k] = idx
    bodies[#bodies + 1] = i
    bodies[#bodies + 1] = put[3]
    rids[#rids + 1] = i
    rids[#rids + 1] = put[2]
    byrid[#byrid + 1] = put[2]
    byrid[#byrid + 1] = i
    all[#all + 1] = i  -- scores as integer strings: Redis formats a Lua number with %.17g and parses it back
    all[#all + 1] = i
    if put[1] == '1' then
      prio[#prio + 1] = i
      ready[#ready + 1] = int(idx - BIG)
    else
      ready[#ready + 1] = i
    end
    ready[#ready + 1] = i
  end
  chunked('HSET', P..'body', bodies, 2)
  chunked('HSET', P..'rid', rids, 2)
  chunked('HSET', P..'byrid', byrid, 2)
  chunked('ZADD', P..'all', all, 2)
  chunked('ZADD', P..'ready', ready, 2)
  if #prio > 0 then chunked('SADD', P..'prio', prio, 1) end
  return idxs
end
-- A consumer's claim: {-1} its session is not the live one; {0} its window is full; else {1 or 2, index, body,
-- ...} (2: fewer than it could take, it drained what was ready for it). wanted: {{key, value}, ...} tags.
local function claim(P, c, session, window, min_index, auto, now, lease, scan_limit, wanted)
  if redis.call('HGET', P..'sess', c) ~= session then return {-1} end
  for _, i in ipairs(redis.call('ZRANGEBYSCORE', P..'pend', '-inf', '(' .. int(now), 'LIMIT', 0, 1000)) do
    requeue(P, i)
  end
  local need = window
  if not auto then need = window - redis.call('ZCARD', P..'pc:'..c) end
  if need <= 0 then
    redis.call('SADD', P..'waitby', ORIGIN)
    return {0}
  end
  local ids = {}
  -- priority items first (scores below 0), then the others; with tags, only items that carry them
  local ranges = {{min_index - BIG, '(0'}, {min_index, '+inf'}}
  -- from the first index on, one range holds both in that order (a call less)
  if #wanted == 0 and min_index <= 1 then ranges = {{'-inf', '+inf'}} end
  for _, range in ipairs(ranges) do
    local offset, scan = 0, scan_limit
    while #ids < need and scan > 0 do
      local chunk = (#wanted == 0) and (need - #ids) or math.min(scan, 500)
      local found = redis.call('ZRANGEBYSCORE', P..'ready', range[1], range[2], 'LIMIT', offset, chunk)
      for _, i in ipairs(found) do
        if #ids < need and (#wanted == 0 or has_tags(redis.call('HGET', P..'body', i), wanted)) then
          ids[#ids + 1] = i
        end
      end
      if #found < chunk then break end
      offset, scan = offset + chunk, scan - chunk
    end
  end
  -- Fewer than it could take: nothing more is ready for this consumer, so the next change must wake it.
  if #ids < need then redis.call('SADD', P..'waitby', ORIGIN) end
  local out = {#ids < need and 2 or 1}
  if #ids == 0 then return out end
  local bodies = redis.call('HMGET', P..'body', unpack(ids))
  for k, i in ipairs(ids) do
    out[#out + 1] = i
    out[#out + 1] = bodies[k]
  end
  if auto then
    drop_unique(P, ids)
  else
    local deadlines, owners, mine, deadline = {}, {}, {}, int(now + lease)
    for _, i in ipairs(ids) do
      deadlines[#deadlines + 1] = deadline
      deadlines[#deadlines + 1] = i
      owners[#owners + 1] = i
      owners[#owners + 1] = c
      mine[#mine + 1] = i
      mine[#mine + 1] = i
    end
    redis.call('ZREM', P..'ready', unpack(ids))
    redis.call('ZADD', P..'pend', unpack(deadlines))
    redis.call('HSET', P..'owner', unpack(owners))
    redis.call('ZADD', P..'pc:'..c, unpack(mine))
  end
  forget_old(P)
  return out
end
-- A claim's terms from ARGV[k]: consumer, session, window, min index, auto ('1'/'0'), now (ms), lease (ms),
-- tag scan limit, then the tags as key, value, ... up to ARGV[last]; returns the claim's reply.
local function claim_from(P, k, last)
  local wanted = {}
  for t = k + 8, last, 2 do wanted[#wanted + 1] = {ARGV[t], ARGV[t + 1]} end
  return claim(P, ARGV[k], ARGV[k + 1], tonumber(ARGV[k + 2]), tonumber(ARGV[k + 3]), ARGV[k + 4] == '1',
               tonumber(ARGV[k + 5]), tonumber(ARGV[k + 6]), tonumber(ARGV[k + 7]), wanted)
end
"""

# ARGV: prefix, channel, queue, number of puts n, n times (priority, requestId, body, max length), then for each
# claim made for a waiting watcher of this process (``store.Handoff``): the count of its terms, its terms
# (claim_from). Returns {{index or -1 (full), ...}, claim reply, ...}: the puts, then each claim's reply.
PUT = _LIB + """
local P = ARGV[1]
local length = redis.call('HLEN', P..'body')
local puts, accepted = {}, {}
local last = 4 + 4 * tonumber(ARGV[4])
for k = 5, last, 4 do
  local maxlen = tonumber(ARGV[k + 3])
  if maxlen > 0 and length >= maxlen then
    puts[#puts + 1] = -1
  else
    puts[#puts + 1] = 0
    accepted[#accepted + 1] = {ARGV[k], ARGV[k + 1], ARGV[k + 2]}
    length = length + 1
  end
end
local idxs, n = insert_many(P, accepted), 0
for k, v in ipairs(puts) do
  if v == 0 then n = n + 1; puts[k] = idxs[n] end
end
wake(P, ARGV[2], ARGV[3])
local out = {puts}
local k = last + 1
while k <= NARGV do
  local n = tonumber(ARGV[k])
  out[#out + 1] = claim_from(P, k + 1, k + n)
  k = k + n + 1
end
return out
"""

# ARGV: prefix, channel, queue, priority, requestId, body, max length, key, ttl ms (0: remember nothing).
# Returns {1, index} for a new item, {0, "index\\nrequestId"} for a key seen within its TTL, {-1} when full.
PUT_ONCE = _LIB + """
local P = ARGV[1]
local seen = redis.call('GET', P..'dk:'..ARGV[8])
if seen then return {0, seen} end
local maxlen = tonumber(ARGV[7])
if maxlen > 0 and redis.call('HLEN', P..'body') >= maxlen then return {-1} end
local idx = insert(P, ARGV[4], ARGV[5], ARGV[6])
if tonumber(ARGV[9]) > 0 then redis.call('SET', P..'dk:'..ARGV[8], int(idx)..'\\n'..ARGV[5], 'PX', ARGV[9]) end
wake(P, ARGV[2], ARGV[3])
return {1, idx}
"""

# A worker's result put and input commit in one script: both land or neither. The two queues'
# keys carry different hash tags ({sink} and {input}), which a single Redis (the supported setup,
# shared by several service processes) runs atomically; Redis Cluster would refuse the script.
# ARGV: put prefix, channel, put queue, priority, requestId, body, max length, remove prefix,
# remove queue, indexes...; returns the put's index, or -1 (full: nothing put, nothing removed).
PUT_AND_REMOVE = _LIB + """
local P, R = ARGV[1], ARGV[8]
local maxlen = tonumber(ARGV[7])
if maxlen > 0 and redis.call('HLEN', P..'body') >= maxlen then return -1 end
local idx = insert(P, ARGV[4], ARGV[5], ARGV[6])
wake(P, ARGV[2], ARGV[3])
local n = drop_many(R, {unpack(ARGV, 10, NARGV)})
forget_old(R)
if n > 0 then wake(R, ARGV[2], ARGV[9]) end
return idx
"""

REMOVE = _LIB + """
local P = ARGV[1]
local n = drop_many(P, {unpack(ARGV, 4, NARGV)})
forget_old(P)
if n > 0 then wake(P, ARGV[2], ARGV[3]) end
return n
"""

TRUNCATE = _LIB + """
local P = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', P..'all', '-inf', '(' .. ARGV[4])
drop_unique(P, ids)
forget_old(P)
if #ids > 0 then wake(P, ARGV[2], ARGV[3]) end
return #ids
"""

POSITION = _LIB + """
local P = ARGV[1]
local i = ARGV[2]
if redis.call('HEXISTS', P..'body', i) == 0 then return -1 end
local deadline = redis.call('ZSCORE', P..'pend', i)
if deadline and tonumber(deadline) >= tonumber(ARGV[3]) then return -2 end
return redis.call('ZCOUNT', P..'ready', '-inf', '(' .. int(score_of(P, i)))
"""

# ARGV: input prefix, sink prefix, progress prefix, now (ms), requestId, index prefix, index key (the last two
# '' unless the requestId is looked up by the index's key). Returns {} (no such index key), or {requestId, state,
# ...}: state 0 = nowhere; 1 = pending (index, body, progress index or false, its body or false); 2 = ready (index,
# body, ready items ahead); 3 = on the sink (index, body).
WHEREABOUTS = _LIB + """
local Q, S, G, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local rid = ARGV[5]
if ARGV[6] ~= '' then
  local k = redis.call('HGET', ARGV[6]..'byrid', ARGV[7])
  local kb = k and redis.call('HGET', ARGV[6]..'body', k)
  if not kb then return {} end
  rid = ''
  for _, f in ipairs(fields(kb)) do if f[1] == 3 then rid = f[2] end end
end
local i = redis.call('HGET', Q..'byrid', rid)
local body = i and redis.call('HGET', Q..'body', i)
if body then
  local deadline = redis.call('ZSCORE', Q..'pend', i)
  if deadline and tonumber(deadline) >= now then
    local g = redis.call('HGET', G..'byrid', rid)
    local gb = g and redis.call('HGET', G..'body', g)
    if not gb then g = false end
    return {rid, 1, i, body, g or false, gb or false}
  end
  return {rid, 2, i, body, redis.call('ZCOUNT', Q..'ready', '-inf', '(' .. int(score_of(Q, i)))}
end
local s = redis.call('HGET', S..'byrid', rid)
local sb = s and redis.call('HGET', S..'body', s)
if sb then return {rid, 3, s, sb} end
return {rid, 0}
"""

# ARGV: prefix, start index, length. Items with index >= start (index, body, ...); fewer than length: armed too.
TAIL = """
local P, length = ARGV[1], tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', P..'all', ARGV[2], '+inf', 'LIMIT', 0, length)
local out = {}
for _, i in ipairs(ids) do
  local body = redis.call('HGET', P..'body', i)
  if body then
    out[#out + 1] = i
    out[#out + 1] = body
  end
end
if #ids < length then redis.call('SADD', P..'waitby', ORIGIN) end
return out
"""

OPEN_SESSION = _LIB + """
local P, c = ARGV[1], ARGV[2]
redis.call('HSET', P..'sess', c, ARGV[3])
local ids = redis.call('ZRANGE', P..'pc:'..c, 0, -1)
local out = {}
for _, i in ipairs(ids) do
  redis.call('ZADD', P..'pend', 'XX', ARGV[4], i)
  out[#out + 1] = i
  out[#out + 1] = redis.call('HGET', P..'body', i)
end
return out
"""

# ARGV: prefix, then a claim's terms (claim_from).
CLAIM = _LIB + """
return claim_from(ARGV[1], 2, NARGV)
"""

PENDING = _LIB + """
local P, c = ARGV[1], ARGV[2]
if redis.call('HGET', P..'sess', c) ~= ARGV[3] then return {-1} end
local out = {1}
for _, i in ipairs(redis.call('ZRANGE', P..'pc:'..c, 0, -1)) do
  out[#out + 1] = i
  out[#out + 1] = redis.call('HGET', P..'body', i)
end
return out
"""

RENEW = _LIB + """
local P, c = ARGV[1], ARGV[2]
if redis.call('HGET', P..'sess', c) ~= ARGV[3] then return -1 end
for _, i in ipairs(redis.call('ZRANGE', P..'pc:'..c, 0, -1)) do
  redis.call('ZADD', P..'pend', 'XX', ARGV[4], i)
end
return 0
"""

FORGET = """
if redis.call('HGET', ARGV[1]..'sess', ARGV[2]) == ARGV[3] then redis.call('HDEL', ARGV[1]..'sess', ARGV[2]) end
return 0
"""

RELEASE = _LIB + """
local P, c = ARGV[1], ARGV[2]
if redis.call('HGET', P..'sess', c) ~= ARGV[3] then return 0 end
redis.call('HDEL', P..'sess', c)
local ids = redis.call('ZRANGE', P..'pc:'..c, 0, -1)
for _, i in ipairs(ids) do requeue(P, i) end
if #ids > 0 then wake(P, ARGV[4], ARGV[5]) end
return #ids
"""

# ARGV: prefix, consumer, session, index, channel, queue. 1 if the item was pending on the consumer's live
# session and is ready again, else 0 (nothing changed).
RELEASE_ONE = _LIB + """
local P, c, i = ARGV[1], ARGV[2], ARGV[4]
if redis.call('HGET', P..'sess', c) ~= ARGV[3] then return 0 end
if redis.call('HGET', P..'owner', i) ~= c then return 0 end
requeue(P, i)
wake(P, ARGV[5], ARGV[6])
return 1
"""


def _prefix(queue: str) -> str:
    return f"cqs:{{{queue}}}:"


def _items(flat: list[Any]) -> list[Item]:
    return [Item(int(flat[k]), flat[k + 1] or b"") for k in range(0, len(flat), 2)]


class _LeanPacking:
    """redis-py's ``pack_command`` with one join per command instead of joins and an encoder call per argument:
    a batch of puts is a command of a hundred arguments or more, which redis-py packed in about three times the
    CPU. The bytes sent are the same (RESP, the command's words split as redis-py does)."""

    encoder: Any

    def pack_command(self, *args: Any) -> list[bytes]:
        head = args[0].encode() if isinstance(args[0], str) else args[0]
        if b" " in head:  # "SCRIPT LOAD": the words go as separate arguments
            args = (*head.split(), *args[1:])
        encoder = self.encoder
        encode, encoding, errors = encoder.encode, encoder.encoding, encoder.encoding_errors
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            kind = type(arg)
            if kind is bytes:
                raw = arg
            elif kind is str:
                raw = arg.encode(encoding, errors)
            elif kind is int:
                raw = b"%d" % arg
            else:  # memoryview, float, and what redis-py refuses (bool, None) with its own error
                raw = encode(arg)
            parts.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
        return [b"".join(parts)]


def _lean_client(url: str, **options: Any) -> aioredis.Redis:
    """A redis-py client whose connections pack commands with ``_LeanPacking`` (for any scheme: the pool's
    connection class, TCP, TLS or Unix socket, gets the packing mixed in)."""
    client = aioredis.Redis.from_url(url, **options)
    pool = client.connection_pool
    pool.connection_class = type(f"Lean{pool.connection_class.__name__}", (_LeanPacking, pool.connection_class), {})
    return client


class _DirectCalls:
    """Commands one at a time per connection, on connections of our own made from a client's pool settings: for
    the hot scripts (puts, claims), where redis-py's pool (a lock, usage counters, a readiness probe and events
    around each command) cost about as much CPU as packing, sending and reading the command itself. No retries,
    as on the client they replace. A connection that failed mid-call (lost, cancelled, timed out) is dropped, as
    redis-py drops it; one that got an error reply is in step and is used again."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._idle: list[Any] = []
        self._open: set[Any] = set()

    async def call(self, *args: Any) -> Any:
        if self._idle:
            connection = self._idle.pop()
        else:
            connection = self._pool.make_connection()
            self._open.add(connection)
        sent = False
        try:
            await connection.connect()  # nothing to do when connected
            await connection.send_command(*args)
            sent = True
            reply = await connection.read_response()
        except redis_errors.ResponseError:
            if not sent:
                self._open.discard(connection)
                await connection.disconnect(nowait=True)
                raise
            self._idle.append(connection)  # an error reply (NOSCRIPT, a script error): the connection is in step
            raise
        except BaseException:
            self._open.discard(connection)
            await connection.disconnect(nowait=True)
            raise
        self._idle.append(connection)
        return reply

    async def close(self) -> None:
        connections, self._open, self._idle = self._open, set(), []
        for connection in connections:
            await connection.disconnect(nowait=True)


class RedisStore(HandoffStore):
    backend = "redis"
    # An auto-commit claim's removals wake this process's waiters on the queue (a long-poll get may wait for them).
    notify_claimed_removals = True

    def __init__(self, url: str, *, call_timeout_s: float = CALL_TIMEOUT_S, committed_ttl_s: float = COMMITTED_TTL_S,
                 committed_max: int = COMMITTED_MAX) -> None:
        self.url = url
        self.call_timeout_s = call_timeout_s
        self.committed_ttl_s = committed_ttl_s
        self.committed_max = committed_max
        super().__init__()
        self._redis: aioredis.Redis | None = None
        self._once: aioredis.Redis | None = None  # no retries: for the scripts that must not run twice
        self._direct: _DirectCalls | None = None  # on _once's settings, for the scripts that must not run twice
        self._subscriber: aioredis.Redis | None = None
        self._listener: asyncio.Task[None] | None = None
        self._scripts: dict[str, tuple[str, str]] = {}  # name -> (SHA1, source)
        # This process's token in 'waitby': a change written here wakes this process's waiters directly,
        # so Redis publishes a notice only when another process waits.
        self._origin = uuid.uuid4().hex

    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """One store call, retries included, bounded by call_timeout_s. The bound is ours rather than the
        client's socket_timeout, which costs redis-py an extra task (asyncio.wait_for) per command sent;
        a call cut off mid-way drops its connection (redis-py closes it on cancellation)."""
        try:
            async with asyncio.timeout(self.call_timeout_s):
                return await fn()
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {str(exc) or f'no answer within {self.call_timeout_s:g} s'}") from exc

    def _script(self, name: str, args: list[Any]) -> Awaitable[Any]:
        """Run a script (one EVALSHA); every call ends with this store's token, which the scripts read
        as ORIGIN."""
        assert self._redis is not None
        return self._evalsha(self._redis.execute_command, name, [*args, self._origin])

    def _script_once(self, name: str, args: list[Any]) -> Awaitable[Any]:
        """Run put/put_and_remove/claim without retries: a retry after a lost reply would put twice, or claim
        items whose frames nobody sends (the watch resyncs after an error instead)."""
        assert self._direct is not None
        return self._evalsha(self._direct.call, name, [*args, self._origin])

    async def _evalsha(self, run: Callable[..., Awaitable[Any]], name: str, args: list[Any]) -> Any:
        """EVALSHA straight through ``run`` (redis-py's Script object adds a layer of wrappers per call); a
        Redis that lost its script cache (restart, SCRIPT FLUSH) gets the script again. NOSCRIPT means the
        script did not run, so running it after loading is no second run."""
        sha, source = self._scripts[name]
        try:
            return await run("EVALSHA", sha, 0, *args)
        except redis_errors.NoScriptError:
            await run("SCRIPT LOAD", source)
            return await run("EVALSHA", sha, 0, *args)

    async def open(self) -> None:
        # Ride out a short Redis restart (about 2 s) before answering 503. A Redis that hangs
        # without dropping the connection costs a call call_timeout_s (see _call), not forever.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=6,
                      supported_errors=(redis_errors.ConnectionError,))
        # No socket_timeout (redis-py 8 defaults it to 5 s): with one, redis-py sends each command under
        # asyncio.wait_for, which on Python 3.11 returns normally when a cancel lands as the send completes,
        # so a cancelled task went on as if never cancelled (a worker waited forever for its progress
        # writer). Our calls are bounded by _call's asyncio.timeout, which never swallows a cancel.
        options: dict[str, Any] = {"socket_connect_timeout": 2, "socket_timeout": None, "health_check_interval": 10}
        self._redis = _lean_client(self.url, retry=retry, **options)
        self._once = _lean_client(self.url, retry=Retry(NoBackoff(), retries=0), **options)
        self._direct = _DirectCalls(self._once)
        # The change listener blocks on its socket between notices: no read timeout there.
        self._subscriber = aioredis.Redis.from_url(self.url, **options)
        for name, source in (("put", PUT), ("put_once", PUT_ONCE), ("put_and_remove", PUT_AND_REMOVE),
                             ("remove", REMOVE), ("truncate", TRUNCATE), ("position", POSITION),
                             ("whereabouts", WHEREABOUTS), ("tail", TAIL), ("open_session", OPEN_SESSION),
                             ("pending", PENDING), ("claim", CLAIM), ("renew", RENEW), ("forget", FORGET),
                             ("release", RELEASE), ("release_one", RELEASE_ONE)):
            script = self._header() + source
            self._scripts[name] = (hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest(), script)
        # Loaded up front: a pipeline of scripts (puts + claims) would otherwise meet NOSCRIPT on first use.
        loading = self._redis.pipeline(transaction=False)
        for _, source in self._scripts.values():
            loading.script_load(source)
        await self._call(loading.execute)
        self._listener = asyncio.create_task(self._listen(), name="queue-redis-listener")

    def _header(self) -> str:
        """The settings every script sees. Scripts that read TIME and then write need effects replication
        (always on from Redis 7; asked for explicitly on 5 and 6)."""
        return (f"local DONE_TTL_MS, DONE_MAX = {max(0, int(self.committed_ttl_s * 1000))}, "
                f"{max(0, self.committed_max)}\n"
                "if redis.replicate_commands then redis.replicate_commands() end\n"
                "local ORIGIN, NARGV = ARGV[#ARGV], #ARGV - 1  -- every call ends with this store's token\n")

    async def close(self) -> None:
        if self._listener is not None:
            # A pub/sub connection cancelled mid-subscribe can hang in its own aclose(); closing the
            # clients below breaks it, so the listener gets a bounded wait, never an unbounded one.
            self._listener.cancel()
            await asyncio.wait({self._listener}, timeout=LISTENER_STOP_S)
            self._listener = None
        if self._direct is not None:
            await self._direct.close()
            self._direct = None
        for client in (self._redis, self._once, self._subscriber):
            if client is not None:
                await client.aclose()
        self._redis = self._once = self._subscriber = None

    async def _listen(self) -> None:
        """Relay change notices from every process to this process's waiters; survive restarts."""
        assert self._subscriber is not None
        while True:
            pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self._notifier.notify_all()  # we may have missed notices while disconnected
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._notifier.notify(message["data"].decode())
            except _UNAVAILABLE as exc:
                log.warning("redis pub/sub lost (%s); reconnecting", exc)
                await asyncio.sleep(0.2)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # noqa: BLE001 - the connection is gone anyway
                    pass

    def changes(self, queue: str) -> asyncio.Event:
        return self._notifier.event(queue)

    async def arm(self, queue: str) -> None:
        r = self._redis
        assert r is not None
        await self._call(lambda: r.sadd(_prefix(queue) + "waitby", self._origin))

    # -- producers and readers -------------------------------------------------

    def _put_args(self, queue: str, requests: list[PutRequest]) -> list[Any]:
        args: list[Any] = [_prefix(queue), CHANNEL, queue, len(requests)]
        for request in requests:
            args += ["1" if request.priority else "0", request.request_id, request.body, request.max_length]
        return args

    async def _put_many(self, queue: str, requests: list[PutRequest]) -> list[int]:
        args = self._put_args(queue, requests)
        replies = await self._call(lambda: self._script_once("put", args))
        return [int(index) for index in replies[0]]

    async def _put_many_and_claim(self, queue: str, requests: list[PutRequest], takers: list[Taker]
                                  ) -> tuple[list[int], list[HandedClaim]]:
        args = self._put_args(queue, requests)
        now_ms = int(time.time() * 1000)
        for taker in takers:
            terms = self._claim_terms(taker, now_ms)
            args.append(len(terms))
            args += terms
        replies = await self._call(lambda: self._script_once("put", args))
        return [int(index) for index in replies[0]], [self._handed(taker, reply)
                                                        for taker, reply in zip(takers, replies[1:], strict=True)]

    @staticmethod
    def _claim_terms(taker: Taker, now_ms: int) -> list[Any]:
        """A claim's terms as the scripts read them (``claim_from``)."""
        spec = taker.spec
        return [taker.consumer, taker.session, spec.window, spec.min_index, "1" if spec.auto_commit else "0", now_ms,
                int(spec.lease_s * 1000), TAG_SCAN_LIMIT, *(part for pair in spec.tags for part in pair)]

    @staticmethod
    def _handed(taker: Taker, reply: list[Any]) -> HandedClaim:
        """A claim's reply (``claim`` in the scripts) as ``HandoffStore`` takes it."""
        if reply[0] == -1:
            return Superseded(f"consumer {taker.consumer!r} reconnected")
        return _items(reply[1:]), reply[0] == 2

    async def put_once(self, queue: str, body: bytes, request_id: str, priority: int, max_length: int, *,
                       key: str, ttl_s: float = IDEMPOTENCY_TTL_S) -> PutOnce:
        result = await self._call(lambda: self._script_once("put_once", [
            _prefix(queue), CHANNEL, queue, "1" if priority else "0", request_id, body, max_length, key,
            max(0, int(ttl_s * 1000))]))
        if int(result[0]) == -1:
            raise QueueFull(f"queue {queue!r} is full ({max_length} items)")
        if int(result[0]) == 0:
            index, _, first_request_id = bytes(result[1]).decode().partition("\n")
            return PutOnce(int(index), first_request_id, duplicate=True)
        self._notifier.notify(queue)
        return PutOnce(int(result[1]), request_id, duplicate=False)

    async def get(self, queue: str, start_index: int, length: int, request_id: str | None) -> list[Item]:
        assert self._redis is not None
        r, p = self._redis, _prefix(queue)

        async def run() -> list[Item]:
            # The client leaves replies undecoded (no decode_responses): ids and bodies are bytes.
            ids: list[bytes]
            if request_id is not None:
                found = cast("bytes | None", await r.hget(p + "byrid", request_id))
                ids = [found] if found is not None and int(found) >= start_index else []
            else:
                ids = cast("list[bytes]", await r.zrangebyscore(p + "all", start_index, "+inf", start=0, num=length))
            if not ids:
                return []
            bodies = cast("list[bytes | None]", await r.hmget(p + "body", ids))
            return [Item(int(i), b) for i, b in zip(ids, bodies, strict=True) if b is not None]

        return await self._call(run)

    async def tail(self, queue: str, start_index: int, length: int) -> list[Item]:
        return _items(await self._call(lambda: self._script("tail", [_prefix(queue), start_index, length])))

    async def lookup(self, queue: str, request_id: str) -> Seen | None:
        assert self._redis is not None
        p = self._redis.pipeline(transaction=True)
        p.hget(_prefix(queue) + "byrid", request_id)
        p.zscore(_prefix(queue) + "done", request_id)
        p.hget(_prefix(queue) + "doneidx", request_id)
        live, forget_at_ms, done = await self._call(p.execute)
        if live is not None:
            return Seen(int(live), committed=False)
        if done is not None and forget_at_ms is not None and forget_at_ms > time.time() * 1000:
            return Seen(int(done), committed=True)
        return None

    async def stats(self, queue: str) -> QueueStats:
        assert self._redis is not None
        p = self._redis.pipeline(transaction=True)
        p.hlen(_prefix(queue) + "body")
        p.get(_prefix(queue) + "seq")
        p.zrange(_prefix(queue) + "all", 0, 0)
        p.hlen(_prefix(queue) + "sess")
        length, last, first, consumers = await self._call(p.execute)
        return QueueStats(length=int(length), first_index=int(first[0]) if first else 0,
                          last_index=int(last or 0), consumers=int(consumers))

    async def position(self, queue: str, index: int) -> Position | None:
        result = await self._call(lambda: self._script("position", [
            _prefix(queue), index, int(time.time() * 1000)]))
        if result == -1:
            return None
        if result == -2:
            return Position(pending=True, waiting=0)
        return Position(pending=False, waiting=int(result))

    async def whereabouts(self, queue: str, sink: str, progress: str, *, request_id: str | None = None,
                          index_queue: str | None = None, index_key: str | None = None) -> Whereabouts | None:
        flat = await self._call(lambda: self._script("whereabouts", [
            _prefix(queue), _prefix(sink), _prefix(progress), int(time.time() * 1000), request_id or "",
            _prefix(index_queue) if index_queue and index_key else "", index_key or ""]))
        if not flat:
            return None
        found, state = bytes(flat[0]).decode(), int(flat[1])
        if state == 1:
            record = Item(int(flat[4]), flat[5]) if flat[4] else None
            return Whereabouts(found, item=Item(int(flat[2]), flat[3]), position=Position(pending=True, waiting=0),
                               progress=record)
        if state == 2:
            return Whereabouts(found, item=Item(int(flat[2]), flat[3]),
                               position=Position(pending=False, waiting=int(flat[4])))
        if state == 3:
            return Whereabouts(found, result=Item(int(flat[2]), flat[3]))
        return Whereabouts(found)

    async def exists(self, queue: str) -> bool:
        r = self._redis
        assert r is not None
        return bool(await self._call(lambda: r.exists(_prefix(queue) + "seq")))

    # -- removal ------------------------------------------------------------------

    async def remove(self, queue: str, indexes: list[int]) -> int:
        removed = await self._call(lambda: self._script("remove", [
            _prefix(queue), CHANNEL, queue, *(str(i) for i in indexes)]))
        self._handoff.removed(queue)
        return int(removed)

    async def put_and_remove(self, put_queue: str, body: bytes, request_id: str, priority: int, max_length: int,
                             remove_queue: str, indexes: list[int]) -> int:
        index = int(await self._call(lambda: self._script_once("put_and_remove", [
            _prefix(put_queue), CHANNEL, put_queue, "1" if priority else "0", request_id, body, max_length,
            _prefix(remove_queue), remove_queue, *(str(i) for i in indexes)])))
        if index == -1:
            raise QueueFull(f"queue {put_queue!r} is full ({max_length} items)")
        self._notifier.notify(put_queue)
        self._handoff.removed(remove_queue)
        return index

    async def truncate(self, queue: str, below_index: int) -> int:
        removed = await self._call(lambda: self._script("truncate", [
            _prefix(queue), CHANNEL, queue, below_index]))
        self._handoff.removed(queue)
        return int(removed)

    # -- consumers ------------------------------------------------------------------

    async def open_session(self, queue: str, consumer: str, session: str, lease_s: float) -> list[Item]:
        deadline = int((time.time() + lease_s) * 1000)
        flat = await self._call(lambda: self._script("open_session", [
            _prefix(queue), consumer, session, deadline]))
        return _items(flat)

    async def _claim(self, taker: Taker) -> tuple[list[Item], bool]:
        args = [_prefix(taker.queue), *self._claim_terms(taker, int(time.time() * 1000))]
        handed = self._handed(taker, await self._call(lambda: self._script_once("claim", args)))
        if isinstance(handed, Exception):
            raise handed
        return handed

    async def pending(self, queue: str, consumer: str, session: str) -> list[Item]:
        flat = await self._call(lambda: self._script("pending", [_prefix(queue), consumer, session]))
        if flat[0] == -1:
            raise Superseded(f"consumer {consumer!r} reconnected")
        return _items(flat[1:])

    async def renew(self, queue: str, consumer: str, session: str, lease_s: float) -> None:
        deadline = int((time.time() + lease_s) * 1000)
        result = await self._call(lambda: self._script("renew", [
            _prefix(queue), consumer, session, deadline]))
        if result == -1:
            raise Superseded(f"consumer {consumer!r} reconnected")

    async def forget(self, queue: str, consumer: str, session: str) -> None:
        self._handoff.leave(queue, consumer, session)
        await self._call(lambda: self._script("forget", [_prefix(queue), consumer, session]))

    async def release(self, queue: str, consumer: str, session: str) -> None:
        self._handoff.leave(queue, consumer, session)
        released = await self._call(lambda: self._script("release", [
            _prefix(queue), consumer, session, CHANNEL, queue]))
        if released:
            self._notifier.notify(queue)

    async def release_one(self, queue: str, consumer: str, session: str, index: int) -> bool:
        released = await self._call(lambda: self._script_once("release_one", [
            _prefix(queue), consumer, session, str(index), CHANNEL, queue]))
        if released:
            self._notifier.notify(queue)
        return bool(released)
