"""Lua for the Redis store's records: conversations, agents, leases.

Every script that changes an agent publishes `agents` on `P:wake`: each
process caches the roster (`list_agents`) until such a notice arrives.

A conversation is the hash `P:c:<id>`: every field of `to_dict()` as its
JSON, so a script changes one field without parsing the rest, plus raw
copies of what sorting and filtering need (`_s` status, `_t` team, `_a`
assignee, '' for none, `_r` urgency rank, `_due` and `_cr` as 16 hex digits
of microseconds, `_last` microseconds of the last message).

Inbox order comes from lexicographic sorted sets (INDEX): every member is
`rank:due:created:id` in fixed width, so ZRANGEBYLEX serves pages in SPEC
order and the last member served is the cursor. Each conversation sits in
four sets of its status: all, its team, its assignee, team and assignee.
"""

from __future__ import annotations

from router.store.redis_lua_queue import COMMON

INDEX = """
local function index_entry(ckey, cid)
  local f = redis.call('HMGET', ckey, '_r', '_due', '_cr', '_s', '_t', '_a')
  local base = P .. ':ix:' .. f[4]
  return f[1] .. ':' .. f[2] .. ':' .. f[3] .. ':' .. cid,
    {base, base .. ':t:' .. f[5], base .. ':a:' .. f[6], base .. ':t:' .. f[5] .. ':a:' .. f[6]}
end
local function unindex(ckey, cid)
  local member, keys = index_entry(ckey, cid)
  for _, key in ipairs(keys) do redis.call('ZREM', key, member) end
end
local function index(ckey, cid)
  local member, keys = index_entry(ckey, cid)
  for _, key in ipairs(keys) do redis.call('ZADD', key, 0, member) end
end
local function conversation_json(ckey)
  local h = redis.call('HGETALL', ckey)
  local parts = {}
  for i = 1, #h, 2 do
    if string.byte(h[i], 1) ~= 95 then parts[#parts + 1] = '"' .. h[i] .. '":' .. h[i + 1] end
  end
  return '{' .. table.concat(parts, ',') .. '}'
end
"""
"""Scripts answer a conversation as one JSON object (`conversation_json`),
put together from the stored fields, which are JSON already: the caller
decodes it in one go instead of one field at a time. Raw copies (`_` fields)
stay out of it."""

# ARGV: P, message id, thread field, new id, message rank or '', received us,
#       received_at JSON, subject JSON, urgency JSON, category JSON, reason JSON,
#       preview JSON, then a JSON array of the new conversation's fields and
#       values (it has absorbed the message already); the rest is
#       Conversation.absorb in Lua. A joined conversation's inbox entry only
#       moves when the message raises its urgency: nothing else in it changes.
# -> nil: no such message; else {created, previous ref JSON or nil, conversation JSON}
THREAD = (
    COMMON
    + INDEX
    + """
local mid = ARGV[2]
local m = P .. ':m:' .. mid
local f = redis.call('HMGET', m, 's', 'c')
if not f[1] then return false end
if f[2] then return {0, false, conversation_json(P .. ':c:' .. f[2])} end
local latest = redis.call('HGET', P .. ':thread', ARGV[3])
local cid, created, previous = latest, 0, false
local c
local cur
if latest then
  cur = redis.call('HMGET', P .. ':c:' .. latest, '_s', '_last', 'preview', 'subject', '_r', 'ref')
end
if cur and cur[1] ~= 'closed' then
  c = P .. ':c:' .. cid
  local received, last = tonumber(ARGV[6]), tonumber(cur[2])
  redis.call('HINCRBY', c, 'message_count', 1)
  if received >= last or not cur[3] or cur[3] == 'null' then
    redis.call('HSET', c, 'preview', ARGV[12])
  end
  if received > last then
    redis.call('HSET', c, 'last_message_at', ARGV[7], '_last', ARGV[6])
  end
  if ARGV[8] ~= 'null' and cur[4] == 'null' then
    redis.call('HSET', c, 'subject', ARGV[8])
  end
  if ARGV[5] ~= '' and tonumber(ARGV[5]) <= tonumber(cur[5]) then
    local moves = ARGV[5] ~= cur[5]
    if moves then unindex(c, cid) end
    redis.call('HSET', c, 'urgency', ARGV[9], 'category', ARGV[10], 'reason', ARGV[11], '_r', ARGV[5])
    if moves then index(c, cid) end
  end
else
  if cur then previous = cur[6] end
  cid, created = ARGV[4], 1
  c = P .. ':c:' .. cid
  local ref = string.format('T-%06d', redis.call('HINCRBY', P .. ':counters', 'conversation_ref', 1))
  redis.call('HSET', c, unpack(cjson.decode(ARGV[13])))
  redis.call('HSET', c, 'ref', '"' .. ref .. '"')
  redis.call('HSET', P .. ':ref', ref, cid)
  redis.call('HSET', P .. ':thread', ARGV[3], cid)
  index(c, cid)
end
redis.call('HSET', m, 'c', cid)
redis.call('ZADD', P .. ':cm:' .. cid, ARGV[6], string.format('%012d', tonumber(f[1])) .. ':' .. mid)
return {created, previous, conversation_json(c)}
"""
)

# ARGV: P, id or ref -> conversation JSON, or nil when unknown
GET_CONVERSATION = (
    COMMON
    + INDEX
    + """
local c = P .. ':c:' .. ARGV[2]
if redis.call('EXISTS', c) == 0 then
  local cid = redis.call('HGET', P .. ':ref', ARGV[2])
  if not cid then return false end
  c = P .. ':c:' .. cid
end
return conversation_json(c)
"""
)

# ARGV: P, id, field, value, ... -> conversation JSON, or nil when unknown
UPDATE_CONVERSATION = (
    COMMON
    + INDEX
    + """
local c = P .. ':c:' .. ARGV[2]
if redis.call('EXISTS', c) == 0 then return false end
unindex(c, ARGV[2])
redis.call('HSET', c, unpack(ARGV, 3))
index(c, ARGV[2])
return conversation_json(c)
"""
)

# ARGV: P, id, agent or '', expected or '', agent JSON, presence the agent must have or ''
# -> nil unknown, {0} lost, {1, conversation JSON}
CLAIM_CONVERSATION = (
    COMMON
    + INDEX
    + """
local c = P .. ':c:' .. ARGV[2]
if redis.call('EXISTS', c) == 0 then return false end
if redis.call('HGET', c, '_a') ~= ARGV[4] then return {0} end
if ARGV[6] ~= '' and redis.call('HGET', P .. ':presence', ARGV[3]) ~= ARGV[6] then return {0} end
unindex(c, ARGV[2])
redis.call('HSET', c, 'assignee', ARGV[5], '_a', ARGV[3])
index(c, ARGV[2])
return {1, conversation_json(c)}
"""
)

# ARGV: P, name, agent JSON, token hash, presence -> 0 when the name is taken
ADD_AGENT = """
local P = ARGV[1]
if redis.call('HSETNX', P .. ':agents', ARGV[2], ARGV[3]) == 0 then return 0 end
redis.call('HSET', P .. ':agent_token', ARGV[2], ARGV[4])
redis.call('HSET', P .. ':presence', ARGV[2], ARGV[5])
if ARGV[4] ~= '' then redis.call('HSET', P .. ':tokens', ARGV[4], ARGV[2]) end
redis.call('PUBLISH', P .. ':wake', 'agents')
return 1
"""

# ARGV: P, name, token hash -> 0 when there is no such agent
SET_AGENT_TOKEN = """
local P = ARGV[1]
if redis.call('HEXISTS', P .. ':agents', ARGV[2]) == 0 then return 0 end
local old = redis.call('HGET', P .. ':agent_token', ARGV[2])
if old and old ~= '' then redis.call('HDEL', P .. ':tokens', old) end
redis.call('HSET', P .. ':agent_token', ARGV[2], ARGV[3])
if ARGV[3] ~= '' then redis.call('HSET', P .. ':tokens', ARGV[3], ARGV[2]) end
redis.call('PUBLISH', P .. ':wake', 'agents')
return 1
"""

# ARGV: P, name -> 0 when there was no such agent
REMOVE_AGENT = """
local P = ARGV[1]
if redis.call('HDEL', P .. ':agents', ARGV[2]) == 0 then return 0 end
local token = redis.call('HGET', P .. ':agent_token', ARGV[2])
if token then redis.call('HDEL', P .. ':tokens', token) end
redis.call('HDEL', P .. ':agent_token', ARGV[2])
redis.call('HDEL', P .. ':presence', ARGV[2])
redis.call('PUBLISH', P .. ':wake', 'agents')
return 1
"""

# ARGV: P, name, presence -> 0 when there is no such agent
SET_PRESENCE = """
local P = ARGV[1]
if redis.call('HEXISTS', P .. ':agents', ARGV[2]) == 0 then return 0 end
redis.call('HSET', P .. ':presence', ARGV[2], ARGV[3])
redis.call('PUBLISH', P .. ':wake', 'agents')
return 1
"""

# ARGV: P, name or '', token hash or '' -> {JSON, token hash, presence} or nil
GET_AGENT = """
local P = ARGV[1]
local name = ARGV[2]
if name == '' then name = redis.call('HGET', P .. ':tokens', ARGV[3]) end
if not name then return false end
local data = redis.call('HGET', P .. ':agents', name)
if not data then return false end
return {data, redis.call('HGET', P .. ':agent_token', name) or '', redis.call('HGET', P .. ':presence', name)}
"""

# Leases: `P:lease:<name>` holds the holder and its fencing token and expires
# by itself; `P:lease_tokens` keeps the last token, so a new holder's is higher.
# ARGV: P, name, holder, ttl ms -> token or nil
ACQUIRE_LEASE = """
local P = ARGV[1]
local key = P .. ':lease:' .. ARGV[2]
local current = redis.call('HMGET', key, 'holder', 'token')
if current[1] == ARGV[3] then
  redis.call('PEXPIRE', key, ARGV[4])
  return tonumber(current[2])
end
if current[1] then return false end
local token = redis.call('HINCRBY', P .. ':lease_tokens', ARGV[2], 1)
redis.call('HSET', key, 'holder', ARGV[3], 'token', token)
redis.call('PEXPIRE', key, ARGV[4])
return token
"""

# ARGV: P, name, holder, ttl ms -> 1 renewed, 0 not the holder (any more)
RENEW_LEASE = """
local key = ARGV[1] .. ':lease:' .. ARGV[2]
if redis.call('HGET', key, 'holder') ~= ARGV[3] then return 0 end
redis.call('PEXPIRE', key, ARGV[4])
return 1
"""

# ARGV: P, name, holder
RELEASE_LEASE = """
local key = ARGV[1] .. ':lease:' .. ARGV[2]
if redis.call('HGET', key, 'holder') == ARGV[3] then redis.call('DEL', key) end
return 1
"""
