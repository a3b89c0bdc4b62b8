"""Lua for the Redis store's queues: each script is one atomic step.

A message lives in the hash `P:m:<id>`: `d` its JSON, `s` its sequence
number, `c` its conversation, `ch` its channel, and while it is queued
inbound `r` (urgency rank) and `q` (its entry in the stream `P:in:<r>`),
`a` hand-outs (attempts); outbound ones keep their delivery in `dl` and the
consumer holding a claim in `ow`.

Inbound claims use the consumer group's pending entries list. A claim sets
the entry's idle time to RECLAIM - visibility, so XAUTOCLAIM with a minimum
idle time of RECLAIM takes it over exactly when its visibility runs out:
the deadline lives in the stream itself, in Redis' own clock, whatever the
daemons' clocks say. (XPENDING therefore shows claimed entries as idle for
about RECLAIM - visibility.)

The outbox is due-time driven, on the clock its callers pass in: per channel
`ready` (score = sequence, due now), `later` (score = when it is due, or
when a claim runs out) and `own:<consumer>` (score = sequence).

Blocked claims sleep on pub/sub: a claim that found nothing registers in
`P:sleep:<in|out>` in the same script, and a script that queues work
publishes on `P:wake` only while someone sleeps, so a busy desk publishes
nothing.
"""

from __future__ import annotations

COMMON = """
local P = ARGV[1]
local GROUP = 'workers'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function wake(kind)
  if redis.call('ZCOUNT', P .. ':sleep:' .. kind, now_ms(), '+inf') > 0 then
    redis.call('PUBLISH', P .. ':wake', kind)
  end
end
local function sleep(kind, member, found, sleep_ms)
  local key = P .. ':sleep:' .. kind
  if found == 0 and sleep_ms > 0 then
    redis.call('ZADD', key, now_ms() + sleep_ms, member)
  else
    redis.call('ZREM', key, member)
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms())
end
local function add_dead(id, channel, payload, err, attempts, created, message_id)
  local seq = redis.call('INCR', P .. ':dlseq')
  redis.call('HSET', P .. ':dl', id, cjson.encode({
    id = id, channel = channel, payload = payload, error = err, attempts = attempts,
    created_at = created, message_id = message_id or cjson.null, seq = seq}))
end
"""

# ARGV: P, dedupe field, id, json, rank, channel -> {id, ref JSON or nil, fresh}
ENQUEUE_INBOUND = (
    COMMON
    + """
local existing = redis.call('HGET', P .. ':inkey', ARGV[2])
if existing then
  local cid = redis.call('HGET', P .. ':m:' .. existing, 'c')
  local ref = false
  if cid then ref = redis.call('HGET', P .. ':c:' .. cid, 'ref') end
  return {existing, ref, 0}
end
redis.call('HSET', P .. ':inkey', ARGV[2], ARGV[3])
local seq = redis.call('INCR', P .. ':seq')
local entry = redis.call('XADD', P .. ':in:' .. ARGV[5], '*', 'm', ARGV[3])
redis.call('HSET', P .. ':m:' .. ARGV[3], 'd', ARGV[4], 's', seq, 'ch', ARGV[6], 'r', ARGV[5], 'q', entry)
wake('in')
return {ARGV[3], false, 1}
"""
)

# ARGV: P, consumer, limit, visibility ms, RECLAIM ms, sleeper, sleep ms,
# max attempts, dead id prefix, created_at, unfinished error format, SUSPECT_AFTER -> message hashes.
# An entry pending for its consumer or idle past RECLAIM was handed out and
# never finished: after SUSPECT_AFTER hand-outs it goes alone (or to the dead
# letters), see Store.claim_inbound.
CLAIM_INBOUND = (
    COMMON
    + """
local consumer, limit = ARGV[2], tonumber(ARGV[3])
local hold_idle = math.max(0, tonumber(ARGV[5]) - tonumber(ARGV[4]))
local max_attempts, dead = tonumber(ARGV[8]), 0
local SUSPECT = tonumber(ARGV[12])
local out = {}
local function drop(stream, id)
  redis.call('XACK', stream, GROUP, id)
  redis.call('XDEL', stream, id)
end
local function take(stream, ids)
  local args = {'XCLAIM', stream, GROUP, consumer, 0}
  for _, id in ipairs(ids) do args[#args + 1] = id end
  args[#args + 1] = 'IDLE'
  args[#args + 1] = hold_idle
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
  for _, id in ipairs(ids) do
    local entry = redis.call('XRANGE', stream, id, id)
    local m = entry[1] and P .. ':m:' .. entry[1][2][2]
    local data = m and redis.call('HGETALL', m)
    if data and #data > 0 then
      redis.call('HINCRBY', m, 'a', 1)
      out[#out + 1] = data
    else
      drop(stream, id)
    end
  end
end
-- An entry pending for its consumer or idle past RECLAIM was handed out and
-- never finished. Returns 'take' (into the batch), 'alone' (a suspect taken
-- by itself: claim nothing more), 'stop' (a suspect left for the next claim)
-- or 'skip' (gone, or dead-lettered).
local function unfinished(stream, id, batch)
  local entry = redis.call('XRANGE', stream, id, id)
  local mid = entry[1] and entry[1][2][2]
  local f = mid and redis.call('HMGET', P .. ':m:' .. mid, 'a', 'd', 'ch')
  if not (f and f[2]) then
    drop(stream, id)
    return 'skip'
  end
  local attempts = tonumber(f[1] or '0')
  if attempts < SUSPECT then return 'take' end
  if #out + #batch > 0 then return 'stop' end
  if attempts >= max_attempts then
    drop(stream, id)
    redis.call('HDEL', P .. ':m:' .. mid, 'q')
    dead = dead + 1
    add_dead(ARGV[9] .. dead, f[3], f[2], string.format(ARGV[11], attempts), attempts, ARGV[10], mid)
    return 'skip'
  end
  take(stream, {id})
  return 'alone'
end
-- fills `out` from one stream; true when nothing may follow
local function claim_from(stream, need)
  local mine = redis.call('XPENDING', stream, GROUP, '-', '+', need, consumer)
  local batch, verdict, seen = {}, nil, {}
  local function consider(id)
    if seen[id] then return false end
    seen[id] = true
    verdict = unfinished(stream, id, batch)
    if verdict == 'take' then batch[#batch + 1] = id end
    return verdict == 'alone' or verdict == 'stop' or #batch >= need
  end
  local done = false
  for _, p in ipairs(mine) do
    done = consider(p[1])
    if done then break end
  end
  local cursor = '0-0'
  while not done do
    local r = redis.call('XAUTOCLAIM', stream, GROUP, consumer, ARGV[5], cursor, 'COUNT', 1, 'JUSTID')
    cursor = r[1]
    for _, id in ipairs(r[2]) do
      done = consider(id)
      if done then break end
    end
    if cursor == '0-0' or dead >= 100 then break end
  end
  if #batch > 0 then take(stream, batch) end
  if verdict == 'alone' or verdict == 'stop' then return true end
  if #batch < need then
    local count = need - #batch
    local r = redis.call('XREADGROUP', 'GROUP', GROUP, consumer, 'COUNT', count, 'STREAMS', stream, '>')
    if r then
      local ids = {}
      for _, entry in ipairs(r[1][2]) do ids[#ids + 1] = entry[1] end
      take(stream, ids)
    end
  end
  return false
end
for rank = 0, 3 do
  local need = limit - #out
  if need <= 0 or claim_from(P .. ':in:' .. rank, need) then break end
end
sleep('in', ARGV[6], #out, tonumber(ARGV[7]))
return out
"""
)

# ARGV: P, id, ...
COMPLETE_INBOUND = (
    COMMON
    + """
for i = 2, #ARGV do
  local m = P .. ':m:' .. ARGV[i]
  local f = redis.call('HMGET', m, 'q', 'r')
  if f[1] then
    local stream = P .. ':in:' .. f[2]
    redis.call('XACK', stream, GROUP, f[1])
    redis.call('XDEL', stream, f[1])
    redis.call('HDEL', m, 'q')
  end
end
return 1
"""
)

# ARGV: P, id, error, max attempts, dead id, created_at -> -1 not queued, 1 dead, 0 retried
FAIL_INBOUND = (
    COMMON
    + """
local m = P .. ':m:' .. ARGV[2]
local f = redis.call('HMGET', m, 'q', 'r', 'd', 'ch')
if not f[1] then return -1 end
local stream = P .. ':in:' .. f[2]
redis.call('XACK', stream, GROUP, f[1])
redis.call('XDEL', stream, f[1])
local attempts = tonumber(redis.call('HGET', m, 'a') or '0')
if attempts >= tonumber(ARGV[4]) then
  redis.call('HDEL', m, 'q')
  add_dead(ARGV[5], f[4], f[3], ARGV[3], attempts, ARGV[6], ARGV[2])
  return 1
end
redis.call('HSET', m, 'q', redis.call('XADD', stream, '*', 'm', ARGV[2]))
wake('in')
return 0
"""
)

# ARGV: P, dead id, channel, payload, error, created_at
ADD_DEAD = (
    COMMON
    + """
add_dead(ARGV[2], ARGV[3], ARGV[4], ARGV[5], 0, ARGV[6], nil)
return 1
"""
)

# ARGV: P, dead id -> 1 requeued, 0 no such stored message
RETRY_DEAD = (
    COMMON
    + """
local raw = redis.call('HGET', P .. ':dl', ARGV[2])
if not raw then return 0 end
local mid = cjson.decode(raw).message_id
if type(mid) ~= 'string' then return 0 end
local m = P .. ':m:' .. mid
local rank = redis.call('HGET', m, 'r')
if not rank then return 0 end
if not redis.call('HGET', m, 'q') then
  redis.call('HSET', m, 'q', redis.call('XADD', P .. ':in:' .. rank, '*', 'm', mid), 'a', 0)
end
redis.call('HDEL', P .. ':dl', ARGV[2])
wake('in')
return 1
"""
)

# ARGV: P, id, json, rank, conversation id or '' -> 0 when unknown.
# A queued message nobody has claimed moves to the stream of its new urgency.
UPDATE_MESSAGE = (
    COMMON
    + """
local m = P .. ':m:' .. ARGV[2]
local f = redis.call('HMGET', m, 's', 'q', 'r')
if not f[1] then return 0 end
redis.call('HSET', m, 'd', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSET', m, 'c', ARGV[5]) end
if f[2] and f[3] ~= ARGV[4] then
  local old = P .. ':in:' .. f[3]
  if #redis.call('XPENDING', old, GROUP, f[2], f[2], 1) == 0 then
    redis.call('XDEL', old, f[2])
    redis.call('HSET', m, 'q', redis.call('XADD', P .. ':in:' .. ARGV[4], '*', 'm', ARGV[2]), 'r', ARGV[4])
    wake('in')
  end
end
return 1
"""
)
