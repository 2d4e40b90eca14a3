-- The task script: this prelude, then one function per operation (OPS.<name>,
-- from <name>.lua), then _dispatch.lua, which runs a batch of operations of
-- one task in order, each atomic and each with its own reply.
-- KEYS[1] meta hash   KEYS[2] reservations hash   KEYS[3] leases zset
-- KEYS[4] ops hash    KEYS[5] events stream       KEYS[6] accounts set
-- KEYS[7] results hash (work id -> a finished subtask's result, saved by close)
-- ARGV[1] prefix of account hashes ("pm:{k:<task>}:acct:")
-- ARGV[2] prefix of accounts' wait queues ("pm:{k:<task>}:wait:"): a list per
--   account of the ids of reservations waiting for held money, oldest first
-- Account hashes and wait queues are not in KEYS: each is ARGV[1] or ARGV[2]
-- .. path, under the same hash tag as KEYS, so on the same Redis Cluster slot.
-- Op ids and the ops-hash markers of open, transfer and close arrive built by
-- budgets/keys.py; no script spells one.
-- Inside an operation, A is its argument list and K its account hash keys.
-- Account hash fields: parent, lt/ln limit (-1 unlimited), rt/rn reserved,
-- st/sn spent by own calls, at/an carved into open children, ct/cn spent by
-- closed children, ot/on overrun, nres open reservations, nkids open children,
-- closed ('0'/'1'); nwait waiting reservations, wt/wn what they ask (absent
-- until an account first has a waiter). Units: t = tokens, n = nano-dollars.
-- A refusal is {'err', code, ...}; each operation's codes and the one error each
-- raises are in its contract header and in budgets/replies.py.
-- The same text runs as a script (EVALSHA: KEYS and ARGV) and as a Redis
-- Function (FCALL: loaded once, so these definitions are not rebuilt on every
-- call); begin() sets what belongs to one call.
local K_META, K_RES, K_LEASES, K_OPS, K_EVENTS, K_ACCTS, K_RESULTS
local ACCT_PREFIX, WAIT_PREFIX
local ROOT = 'root'
local FIELDS = {'lt', 'ln', 'rt', 'rn', 'st', 'sn', 'at', 'an', 'ct', 'cn', 'ot', 'on', 'nres', 'nkids'}
local UNITS = {'t', 'n'}
local UNIT_NAME = {t = 'tokens', n = 'nanos'}
-- The field names of each unit (F.t.l == 'lt'): looked up, not concatenated,
-- since building a string on every use is most of what the hot paths cost.
-- (Spelled out: a Redis Function library cannot call ipairs while it loads.)
local F = {
  t = {l = 'lt', r = 'rt', s = 'st', a = 'at', c = 'ct', w = 'wt', o = 'ot'},
  n = {l = 'ln', r = 'rn', s = 'sn', a = 'an', c = 'cn', w = 'wn', o = 'on'},
}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local NOW, SWEPT = 0, 0
local OPS = {}

-- Integers as text without an exponent (Lua's own tostring would write 1e+15).
local function int(x) return string.format('%d', x) end

local function load(key)
  local v = redis.call('HMGET', key, 'parent', 'closed', 'nwait', 'wt', 'wn', unpack(FIELDS))
  if not v[1] then return nil end
  local a = {key = key, parent = v[1], closed = v[2] == '1',
    nwait = tonumber(v[3]) or 0, wt = tonumber(v[4]) or 0, wn = tonumber(v[5]) or 0,
    waits = v[3] ~= false}
  for i, f in ipairs(FIELDS) do a[f] = tonumber(v[i + 5]) end
  return a
end

local function limited(a, u) return a[F[u].l] >= 0 end

-- Raw room left in unit u of a limited account; negative only after an overrun.
local function room(a, u)
  local f = F[u]
  return a[f.l] - a[f.r] - a[f.s] - a[f.a] - a[f.c]
end

-- Room as callers see it: -1 when unlimited, never below zero.
local function shown(a, u)
  if not limited(a, u) then return -1 end
  return math.max(0, room(a, u))
end

-- The audit events of this call, written once at its end (flush_events): one
-- stream entry as it is when the call made one event, else one entry
-- {op = 'batch', events = ...} holding them all in order, each event's fields
-- joined by \31 and the events by \30 (no field holds either: names, numbers,
-- JSON text and free text that came in through the operation's own fields).
-- An event is kept as its joined text from the start: building it in one
-- concatenation costs a third of what a table of its fields, joined later, did.
local EVENTS

local function text(x)
  if type(x) == 'number' then return int(x) end
  return x
end

-- tail: the event's further fields as text, each name and value preceded by
-- \31 ('\31tags\31' .. tags .. '\31deadline\31' .. int(deadline)), or nil. The
-- caller joins them: a table of them would cost more than the concatenation.
local function event(op, path, t, n, id, tail)
  EVENTS[#EVENTS + 1] = 'op\31' .. op .. '\31acct\31' .. path .. '\31t\31' .. text(t)
    .. '\31n\31' .. text(n) .. '\31id\31' .. id .. (tail or '')
end

local function flush_events()
  if #EVENTS == 1 then
    local f, n = {}, 0
    for x in string.gmatch(EVENTS[1] .. '\31', '([^\31]*)\31') do
      n = n + 1
      f[n] = x
    end
    redis.call('XADD', K_EVENTS, '*', unpack(f))
  elseif #EVENTS > 1 then
    redis.call('XADD', K_EVENTS, '*', 'op', 'batch', 'events', table.concat(EVENTS, '\30'))
  end
  EVENTS = {}
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
-- (a late commit); 'waiting' -> 'held', or the record is deleted (the wait
-- ended without a hold: nothing of it stays but its events). flags: two
-- characters, late then estimated ('0'/'1'). While waiting, the deadline is the
-- wait's, and the used fields hold the lease (ms) the hold will get and the
-- time (ms) it was queued.
-- The record is its idempotency too: a repeated reserve, commit or release reads
-- the state and answers as the first call did. Numbers stay in the text they
-- arrived in (ts, ns, ...); only t and n are read as numbers.
-- Spelled out: a Redis Function library may not call string.rep while it loads.
local RES_PATTERN = '^' .. '([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|'
  .. '([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$'

local function unpack_res(rec)
  local s, path, t, n, d, ut, un, ot, on, flags, tags = string.match(rec, RES_PATTERN)
  return {state = s, path = path, ts = t, ns = n, t = tonumber(t), n = tonumber(n), ds = d,
    uts = ut, uns = un, ots = ot, ons = on, late = string.sub(flags, 1, 1) == '1',
    est = string.sub(flags, 2, 2) == '1', tags = tags}
end

local function pack_res(r)
  return r.state .. '|' .. r.path .. '|' .. r.ts .. '|' .. r.ns .. '|'
    .. r.ds .. '|' .. r.uts .. '|' .. r.uns .. '|' .. r.ots .. '|' .. r.ons .. '|'
    .. (r.late and '1' or '0') .. (r.est and '1' or '0') .. '|' .. r.tags
end

local function save_res(rid, r)
  redis.call('HSET', K_RES, rid, pack_res(r))
end

-- Writes the counters a hold, a wait or a settlement moves, from an account
-- loaded and changed in memory: one call however many of them changed.
local function write_holds(a)
  if a.waits or a.nwait > 0 then
    redis.call('HSET', a.key, 'rt', a.rt, 'rn', a.rn, 'nres', a.nres, 'st', a.st, 'sn', a.sn,
      'nwait', a.nwait, 'wt', a.wt, 'wn', a.wn)
  else
    redis.call('HSET', a.key, 'rt', a.rt, 'rn', a.rn, 'nres', a.nres, 'st', a.st, 'sn', a.sn)
  end
end

-- The accounts the calls of a batch work on, read once and written once. The
-- hot operations (reserve, commit, release, withdraw, and the lease sweep) take
-- an account through acct(): the first reads it, the rest of the batch uses
-- and changes that copy, and flush_cache() writes every changed one back (at
-- the end of the call, and before any other operation, which then reads and
-- writes Redis itself). Only the fields write_holds() writes change in a copy;
-- anything else an operation writes directly goes to Redis after a flush.
local CACHE, DIRTY

local function acct(path)
  local a = CACHE[path]
  if a == nil then
    a = load(ACCT_PREFIX .. path)
    if not a then return nil end
    a.path, a.cached = path, true
    CACHE[path] = a
  end
  return a
end

local function save_holds(a)
  if not a.cached then
    write_holds(a)
  elseif not a.dirty then
    a.dirty = true
    DIRTY[#DIRTY + 1] = a
  end
end

local function flush_cache()
  for _, a in ipairs(DIRTY) do write_holds(a) end
  for _, a in pairs(CACHE) do a.cached = false end
  CACHE, DIRTY = {}, {}
end

-- Admission of an ask {t, n} on an open account a:
--   'fits'  within the room, less what waiters queued before it ask (the queue
--           is served first: nobody passes a waiter);
--   'spent' more than the room even if every hold in flight came back unspent:
--           waiting cannot help, so it is refused at once;
--   'wait'  otherwise: held money may settle and make room.
-- queued: the ask is itself in the queue (its own ask is in wt/wn), at its head.
local function admit(a, want, queued)
  local verdict = 'fits'
  for _, u in ipairs(UNITS) do
    if limited(a, u) then
      local r = room(a, u)
      if want[u] > r + a[F[u].r] then return 'spent' end
      local ahead = 0
      if not queued then ahead = a[F[u].w] end
      if want[u] > r - ahead then verdict = 'wait' end
    end
  end
  return verdict
end

-- What a newcomer is shown as available in unit u: the room less what waiters ask.
local function open_room(a, u)
  return math.max(0, room(a, u) - a[F[u].w])
end

local function hold(a, t, n)
  a.rt, a.rn, a.nres = a.rt + t, a.rn + n, a.nres + 1
end

local function unhold(a, r)
  a.rt, a.rn, a.nres = a.rt - r.t, a.rn - r.n, a.nres - 1
end

-- A waiting reservation leaves the queue without a hold (its record goes; a
-- reserve with its id later is evaluated afresh). The caller removes it from
-- the queue list.
local function unwait(a, rid, r, reason)
  a.nwait, a.wt, a.wn = a.nwait - 1, a.wt - r.t, a.wn - r.n
  redis.call('HDEL', K_RES, rid)
  redis.call('ZREM', K_LEASES, rid)
  event('unwait', r.path, r.ts, r.ns, rid, '\31tags\31' .. r.tags .. '\31reason\31' .. reason
    .. '\31waited_ms\31' .. int(NOW - tonumber(r.uns)))
end

-- Serve an account's queue, oldest first, after money came back or was added:
-- the head is granted while it fits, refused while its money is spent, and the
-- queue stops at the first that must still wait (no later one passes it).
-- Saves the account's counters.
local function serve(a)
  if a.nwait > 0 and not a.closed then
    local q = WAIT_PREFIX .. a.path
    while a.nwait > 0 do
      local rid = redis.call('LINDEX', q, 0)
      if not rid then break end
      local rec = redis.call('HGET', K_RES, rid)
      local r = rec and unpack_res(rec)
      if r and r.state == 'waiting' then
        local verdict = admit(a, {t = r.t, n = r.n}, true)
        if verdict == 'wait' then break end
        if verdict == 'fits' then
          a.nwait, a.wt, a.wn = a.nwait - 1, a.wt - r.t, a.wn - r.n
          hold(a, r.t, r.n)
          local deadline = NOW + tonumber(r.uts)
          local waited = NOW - tonumber(r.uns)
          r.state, r.ds, r.uts, r.uns = 'held', int(deadline), '0', '0'
          save_res(rid, r)
          redis.call('ZADD', K_LEASES, deadline, rid)
          event('reserve', r.path, r.ts, r.ns, rid, '\31tags\31' .. r.tags .. '\31deadline\31'
            .. int(deadline) .. '\31waited_ms\31' .. int(waited))
        else
          unwait(a, rid, r, 'spent')
        end
      end
      redis.call('LPOP', q)
    end
  end
  save_holds(a)
end

-- A waiting reservation leaves its queue at its caller's word (withdraw,
-- release); whoever waited behind it may fit now.
local function withdraw_res(rid, r, reason)
  local a = acct(r.path)
  unwait(a, rid, r, reason)
  redis.call('LREM', WAIT_PREFIX .. r.path, 1, rid)
  serve(a)
end

-- A held reservation whose lease ran out (or whose account is closed by force)
-- gives its hold back; a commit may still come, late.
local function expire_res(a, rid, r, tail)
  unhold(a, r)
  r.state = 'expired'
  save_res(rid, r)
  event('expire', r.path, r.t, r.n, rid, tail)
end

-- Release every reservation whose lease ran out, and end every wait whose
-- deadline passed (oldest first, a bounded batch per call so no script runs
-- long; the reaper loops until none are left).
local function sweep(limit)
  local ids = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', NOW, 'LIMIT', 0, limit)
  if #ids == 0 then return 0 end
  local recs = redis.call('HMGET', K_RES, unpack(ids))
  local touched, order = {}, {}
  for i, id in ipairs(ids) do
    if recs[i] then
      local r = unpack_res(recs[i])
      if r.state == 'held' or r.state == 'waiting' then
        local a = touched[r.path]
        if not a then
          a = acct(r.path)
          touched[r.path] = a
          order[#order + 1] = r.path
        end
        if r.state == 'held' then
          expire_res(a, id, r, '\31tags\31' .. r.tags)
        else
          unwait(a, id, r, 'deadline')
          redis.call('LREM', WAIT_PREFIX .. r.path, 1, id)
        end
      end
    end
  end
  redis.call('ZREM', K_LEASES, unpack(ids))
  for _, path in ipairs(order) do serve(touched[path]) end
  return #ids
end

-- Start one call of the task script: its keys, prefixes and clock.
local function begin(keys, argv)
  K_META, K_RES, K_LEASES, K_OPS, K_EVENTS, K_ACCTS = keys[1], keys[2], keys[3], keys[4], keys[5], keys[6]
  K_RESULTS = keys[7]
  ACCT_PREFIX, WAIT_PREFIX = argv[1], argv[2]
  NOW, SWEPT = now_ms(), 0
  EVENTS, CACHE, DIRTY = {}, {}, {}
end
