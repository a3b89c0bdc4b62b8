"""Lua for the Redis store's outbox (see redis_lua_queue for the layout)."""

from __future__ import annotations

from router.store.redis_lua_queue import COMMON

PROMOTE_MAX = 1000
"""Due messages moved to `ready` per channel and claim: bounds one script's run."""

CAPPED = 2
"""ENQUEUE_OUTBOUND's answer when the recipient's acks reached the cap."""

# ARGV: P, id, json, channel, conversation id or '', received us, received_at JSON,
#       kind, dedupe field, delivery JSON, queued '1'/'0', due (s), recipient id,
#       cap or '' for none, since (us): with a cap, nothing is stored when the
#       recipient has `cap` acks or more on this channel since then (per-sender cap)
# -> nil: no such conversation; {1, hash}: stored before; {0, hash}: stored now;
#    {CAPPED}: over the cap
ENQUEUE_OUTBOUND = (
    COMMON
    + f"""
local id, channel, cid = ARGV[2], ARGV[4], ARGV[5]
local m = P .. ':m:' .. id
if redis.call('EXISTS', m) == 1 then return {{1, redis.call('HGETALL', m)}} end
local acks = P .. ':acks:' .. channel .. ':' .. ARGV[13]
if ARGV[14] ~= '' and redis.call('ZCOUNT', acks, ARGV[15], '+inf') >= tonumber(ARGV[14]) then
  return {{{CAPPED}}}
end
if cid ~= '' then
  local c = P .. ':c:' .. cid
  if redis.call('EXISTS', c) == 0 then return false end
  redis.call('HINCRBY', c, 'message_count', 1)
  if tonumber(ARGV[6]) > tonumber(redis.call('HGET', c, '_last')) then
    redis.call('HSET', c, 'last_message_at', ARGV[7], '_last', ARGV[6])
  end
  if ARGV[8] == 'agent' and redis.call('HGET', c, 'first_response_at') == 'null' then
    redis.call('HSET', c, 'first_response_at', ARGV[7])
  end
  if ARGV[8] == 'ack' then redis.call('HSET', c, 'acked', 'true') end
end
local seq = redis.call('INCR', P .. ':seq')
redis.call('HSET', m, 'd', ARGV[3], 's', seq, 'ch', channel, 'dl', ARGV[10])
if cid ~= '' then
  redis.call('HSET', m, 'c', cid)
  redis.call('ZADD', P .. ':cm:' .. cid, ARGV[6], string.format('%012d', seq) .. ':' .. id)
end
redis.call('ZADD', P .. ':outlog:' .. channel, seq, id)
redis.call('HSETNX', P .. ':outkey', ARGV[9], id)
if ARGV[8] == 'ack' then redis.call('ZADD', acks, ARGV[6], id) end
if ARGV[11] == '1' then
  redis.call('ZADD', P .. ':out:' .. channel .. ':later', ARGV[12], id)
  wake('out')
end
return {{0, redis.call('HGETALL', m)}}
"""
)

# ARGV: P, consumer, at (s), limit, visibility (s), sleeper, sleep ms, channel... -> hashes
CLAIM_OUTBOUND = (
    COMMON
    + f"""
local consumer, at, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local candidates = {{}}
for i = 8, #ARGV do
  local base = P .. ':out:' .. ARGV[i]
  local due = redis.call('ZRANGEBYSCORE', base .. ':later', '-inf', ARGV[3], 'LIMIT', 0, {PROMOTE_MAX})
  for _, id in ipairs(due) do
    local f = redis.call('HMGET', P .. ':m:' .. id, 's', 'ow')
    if f[2] then
      redis.call('ZREM', base .. ':own:' .. f[2], id)
      redis.call('HDEL', P .. ':m:' .. id, 'ow')
    end
    redis.call('ZREM', base .. ':later', id)
    redis.call('ZADD', base .. ':ready', f[1], id)
  end
  for _, key in ipairs({{base .. ':own:' .. consumer, base .. ':ready'}}) do
    local r = redis.call('ZRANGE', key, 0, limit - 1, 'WITHSCORES')
    for j = 1, #r, 2 do candidates[#candidates + 1] = {{tonumber(r[j + 1]), r[j], base}} end
  end
end
table.sort(candidates, function(a, b) return a[1] < b[1] end)
local out = {{}}
for j = 1, math.min(limit, #candidates) do
  local seq, id, base = candidates[j][1], candidates[j][2], candidates[j][3]
  redis.call('ZREM', base .. ':ready', id)
  redis.call('ZADD', base .. ':later', at + tonumber(ARGV[5]), id)
  redis.call('ZADD', base .. ':own:' .. consumer, seq, id)
  redis.call('HSET', P .. ':m:' .. id, 'ow', consumer)
  out[#out + 1] = redis.call('HGETALL', P .. ':m:' .. id)
end
sleep('out', ARGV[6], #out, tonumber(ARGV[7]))
return out
"""
)

# ARGV: P, id, delivery JSON, queued '1'/'0', due (s) -> hash, or nil for no such message
RECORD_DELIVERY = (
    COMMON
    + """
local id = ARGV[2]
local m = P .. ':m:' .. id
local f = redis.call('HMGET', m, 'ch', 'ow', 's')
if not f[3] then return false end
local base = P .. ':out:' .. f[1]
redis.call('ZREM', base .. ':ready', id)
redis.call('ZREM', base .. ':later', id)
if f[2] then
  redis.call('ZREM', base .. ':own:' .. f[2], id)
  redis.call('HDEL', m, 'ow')
end
redis.call('HSET', m, 'dl', ARGV[3])
if ARGV[4] == '1' then
  redis.call('ZADD', base .. ':later', ARGV[5], id)
  wake('out')
end
return redis.call('HGETALL', m)
"""
)

# ARGV: P, channel, upto: queued messages with seq <= upto are sent (pull mode)
MARK_PULLED = (
    COMMON
    + """
local base = P .. ':out:' .. ARGV[2]
local upto = tonumber(ARGV[3])
local function sent(id)
  local m = P .. ':m:' .. id
  local f = redis.call('HMGET', m, 'dl', 'ow')
  local attempts = 0
  if f[1] then attempts = tonumber(cjson.decode(f[1]).attempts) or 0 end
  redis.call('HSET', m, 'dl', string.format(
    '{"status":"sent","attempts":%d,"error":null,"next_attempt_at":null}', attempts + 1))
  if f[2] then
    redis.call('ZREM', base .. ':own:' .. f[2], id)
    redis.call('HDEL', m, 'ow')
  end
  redis.call('ZREM', base .. ':ready', id)
  redis.call('ZREM', base .. ':later', id)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', base .. ':ready', '-inf', upto)) do sent(id) end
for _, id in ipairs(redis.call('ZRANGE', base .. ':later', 0, -1)) do
  if tonumber(redis.call('HGET', P .. ':m:' .. id, 's')) <= upto then sent(id) end
end
return 1
"""
)
