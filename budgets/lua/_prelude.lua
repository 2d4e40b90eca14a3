-- The task script: this prelude, then one function per operation (OPS.<name>,
-- from <name>.lua), then _dispatch.lua, which runs a batch of operations of
-- one task in order, each atomic and each with its own reply.
-- KEYS[1] meta hash   KEYS[2] reservations hash   KEYS[3] leases zset
-- KEYS[4] ops hash    KEYS[5] events stream       KEYS[6] accounts set
-- ARGV[1] prefix of account hashes ("pm:{<task>}:acct:")
-- Account hashes are not in KEYS: every one is ARGV[1] .. path, under the same
-- hash tag as KEYS, so it lives on the same Redis Cluster slot.
-- Inside an operation, A is its argument list and K its account hash keys.
-- Account hash fields: parent, lt/ln limit (-1 unlimited), rt/rn reserved,
-- st/sn spent by own calls, at/an carved into open children, ct/cn spent by
-- closed children, ot/on overrun, nres open reservations, nkids open children,
-- closed ('0'/'1'). Units: t = tokens, n = nano-dollars.
local K_META, K_RES, K_LEASES, K_OPS, K_EVENTS, K_ACCTS = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ACCT_PREFIX = ARGV[1]
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

-- Idempotency: the first reply of an operation is kept under its op key with a
-- fingerprint of its arguments; a retry gets that reply, a different operation
-- under the same id gets a conflict.
local function replay(kept, fingerprint)
  local r = cmsgpack.unpack(kept)
  if r[1] ~= fingerprint then return {'err', 'conflict'} end
  return r[2]
end

local function recall(op_key, fingerprint)
  local c = redis.call('HGET', K_OPS, op_key)
  if not c then return nil end
  return replay(c, fingerprint)
end

local function remember(op_key, fingerprint, reply)
  redis.call('HSET', K_OPS, op_key, cmsgpack.pack({fingerprint, reply}))
  return reply
end

-- A reservation record is plain text so Python can read it too:
-- "<account>|<tokens>|<nanos>|<deadline ms>|<tags JSON>".
local function pack_res(path, t, n, deadline, tags)
  return path .. '|' .. t .. '|' .. n .. '|' .. string.format('%d', deadline) .. '|' .. tags
end

local function unpack_res(rec)
  local path, t, n, d, tags = string.match(rec, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return {path, tonumber(t), tonumber(n), tonumber(d), tags}
end

local function drop_hold(path, t, n)
  local key = ACCT_PREFIX .. path
  redis.call('HINCRBY', key, 'rt', 0 - t)
  redis.call('HINCRBY', key, 'rn', 0 - n)
  redis.call('HINCRBY', key, 'nres', -1)
end

-- Release every reservation whose lease ran out (oldest first, a bounded batch
-- per call so no script runs long; the reaper loops until none are left).
local function sweep(limit)
  local ids = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', NOW, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local rec = redis.call('HGET', K_RES, id)
    if rec then
      local r = unpack_res(rec)
      drop_hold(r[1], r[2], r[3])
      redis.call('HDEL', K_RES, id)
      redis.call('HSET', K_OPS, 'x:' .. id, rec)
      event('expire', r[1], r[2], r[3], id, {'tags', r[5]})
    end
    redis.call('ZREM', K_LEASES, id)
  end
  return #ids
end
