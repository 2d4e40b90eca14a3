-- The task script: this prelude, then one function per operation (OPS.<name>,
-- from <name>.lua), then _dispatch.lua, which runs a batch of operations of
-- one task in order, each atomic and each with its own reply.
-- KEYS[1] meta hash   KEYS[2] reservations hash   KEYS[3] leases zset
-- KEYS[4] ops hash    KEYS[5] events stream       KEYS[6] accounts set
-- ARGV[1] prefix of account hashes ("pm:{k:<task>}:acct:")
-- Account hashes are not in KEYS: every one is ARGV[1] .. path, under the same
-- hash tag as KEYS, so it lives on the same Redis Cluster slot.
-- Op ids and the ops-hash markers of open, transfer and close arrive built by
-- budgets/keys.py; no script spells one.
-- Inside an operation, A is its argument list and K its account hash keys.
-- Account hash fields: parent, lt/ln limit (-1 unlimited), rt/rn reserved,
-- st/sn spent by own calls, at/an carved into open children, ct/cn spent by
-- closed children, ot/on overrun, nres open reservations, nkids open children,
-- closed ('0'/'1'). Units: t = tokens, n = nano-dollars.
-- A refusal is {'err', code, ...}; each operation's codes and the one error each
-- raises are in its contract header and in budgets/replies.py.
local K_META, K_RES, K_LEASES, K_OPS, K_EVENTS, K_ACCTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ACCT_PREFIX = ARGV[1]
local ROOT = 'root'
local FIELDS = {'lt', 'ln', 'rt', 'rn', 'st', 'sn', 'at', 'an', 'ct', 'cn', 'ot', 'on', 'nres', 'nkids'}
local UNITS = {'t', 'n'}
local UNIT_NAME = {t = 'tokens', n = 'nanos'}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local NOW = now_ms()
local SWEPT = 0
local OPS = {}

-- Integers as text without an exponent (Lua's own tostring would write 1e+15).
local function int(x) return string.format('%d', x) end

local function load(key)
  local v = redis.call('HMGET', key, 'parent', 'closed', unpack(FIELDS))
  if not v[1] then return nil end
  local a = {key = key, parent = v[1], closed = v[2] == '1'}
  for i, f in ipairs(FIELDS) do a[f] = tonumber(v[i + 2]) end
  return a
end

local function limited(a, u) return a['l' .. u] >= 0 end

-- Raw room left in unit u of a limited account; negative only after an overrun.
local function room(a, u)
  return a['l' .. u] - a['r' .. u] - a['s' .. u] - a['a' .. u] - a['c' .. u]
end

-- Room as callers see it: -1 when unlimited, never below zero.
local function shown(a, u)
  if not limited(a, u) then return -1 end
  return math.max(0, room(a, u))
end

local function event(op, path, t, n, id, extra)
  local args = {'XADD', K_EVENTS, '*', 'op', op, 'acct', path, 't', t, 'n', n, 'id', id}
  if extra then
    for i = 1, #extra do args[#args + 1] = extra[i] end
  end
  redis.call(unpack(args))
end

-- Idempotency of open, transfer and close: the first reply is kept under the
-- operation's marker with a fingerprint of its arguments. kept() returns
-- {fingerprint, reply} or nil; the operation compares the fingerprint itself.
local function kept(marker)
  local c = redis.call('HGET', K_OPS, marker)
  if not c then return nil end
  return cmsgpack.unpack(c)
end

local function remember(marker, fingerprint, reply)
  redis.call('HSET', K_OPS, marker, cmsgpack.pack({fingerprint, reply}))
  return reply
end

-- A reservation is one record in the reservations hash, plain text so Python
-- reads it too (budgets/tree.py reservation_from_record):
--   state|account|tokens|nanos|deadline ms|used tokens|used nanos|
--   overrun tokens|overrun nanos|flags|tags JSON
-- state: 'held' -> 'committed' | 'released' | 'expired'; 'expired' -> 'committed'
-- (a late commit). flags: two characters, late then estimated ('0'/'1').
-- The record is its idempotency too: a repeated reserve, commit or release reads
-- the state and answers as the first call did. Numbers stay in the text they
-- arrived in (ts, ns, ...); only t and n are read as numbers.
local RES_PATTERN = '^' .. string.rep('([^|]*)|', 10) .. '(.*)$'

local function unpack_res(rec)
  local s, path, t, n, d, ut, un, ot, on, flags, tags = string.match(rec, RES_PATTERN)
  return {state = s, path = path, ts = t, ns = n, t = tonumber(t), n = tonumber(n), ds = d,
    uts = ut, uns = un, ots = ot, ons = on, late = string.sub(flags, 1, 1) == '1',
    est = string.sub(flags, 2, 2) == '1', tags = tags}
end

local function save_res(rid, r)
  redis.call('HSET', K_RES, rid, r.state .. '|' .. r.path .. '|' .. r.ts .. '|' .. r.ns .. '|'
    .. r.ds .. '|' .. r.uts .. '|' .. r.uns .. '|' .. r.ots .. '|' .. r.ons .. '|'
    .. (r.late and '1' or '0') .. (r.est and '1' or '0') .. '|' .. r.tags)
end

local function drop_hold(path, t, n)
  local key = ACCT_PREFIX .. path
  redis.call('HINCRBY', key, 'rt', 0 - t)
  redis.call('HINCRBY', key, 'rn', 0 - n)
  redis.call('HINCRBY', key, 'nres', -1)
end

-- A held reservation whose lease ran out (or whose account is closed by force)
-- gives its hold back; a commit may still come, late.
local function expire_res(rid, r, extra)
  drop_hold(r.path, r.t, r.n)
  r.state = 'expired'
  save_res(rid, r)
  event('expire', r.path, r.t, r.n, rid, extra)
end

-- Release every reservation whose lease ran out (oldest first, a bounded batch
-- per call so no script runs long; the reaper loops until none are left).
local function sweep(limit)
  local ids = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', NOW, 'LIMIT', 0, limit)
  if #ids == 0 then return 0 end
  local recs = redis.call('HMGET', K_RES, unpack(ids))
  for i, id in ipairs(ids) do
    if recs[i] then
      local r = unpack_res(recs[i])
      if r.state == 'held' then expire_res(id, r, {'tags', r.tags}) end
    end
  end
  redis.call('ZREM', K_LEASES, unpack(ids))
  return #ids
end
