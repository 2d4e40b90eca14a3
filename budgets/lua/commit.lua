-- commit: turn a reservation into spend with the usage actually reported.
-- Usage below the reservation returns the rest to the account; usage above what
-- the account can cover is still recorded (the money was spent) as an overrun.
-- A commit after the lease expired is recorded too and flagged late.
-- A[1] reservation id  A[2] used tokens  A[3] used nanos
-- (both -1: no usage was reported; charge the whole reservation, flagged estimated)
-- A[4] tags ('' none)
-- A[5] marker to keep the call's reply under in the ops hash ('' none; built by
--   budgets/keys.py kept_marker)  A[6] the reply, kept as given. Kept in the same
--   step as the payment, so a caller that crashes after the commit finds what it
--   paid for instead of paying for it again.
-- returns {'ok', path, used_tokens, used_nanos, overrun_tokens, overrun_nanos, late,
--   estimated, tenant, incarnation, root_spent_tokens, root_spent_nanos}; the last
--   four are '', '', -1, -1 unless the commit is late and the task's root is closed:
--   its tenant was settled already, and the caller reports the root's spend to it.
-- errors (budgets/replies.py CommitError):
--   'unknown' -> UnknownReservation      the id was never reserved (or is still waiting)
--   'released' -> ReservationSettled     it was released
--   'conflict' -> OperationConflict      committed already, with other usage
local function keep(A)
  if A[5] ~= nil and A[5] ~= '' then redis.call('HSETNX', K_OPS, A[5], A[6]) end
end

local function committed(r)
  local tenant, inc, tt, tn = '', '', -1, -1
  if r.late then
    flush_cache()  -- the root's spend is read from Redis
    local m = redis.call('HMGET', K_META, 'status', 'tenant', 'inc')
    if m[1] == 'closed' and m[2] ~= '' then
      local root = redis.call('HMGET', ACCT_PREFIX .. ROOT, 'st', 'sn', 'ct', 'cn')
      tenant, inc = m[2], m[3]
      tt, tn = tonumber(root[1]) + tonumber(root[3]), tonumber(root[2]) + tonumber(root[4])
    end
  end
  return {'ok', r.path, r.uts, r.uns, r.ots, r.ons, r.late and 1 or 0, r.est and 1 or 0,
    tenant, inc, tt, tn}
end

OPS['commit'] = function(A, K)
  local rid = A[1]
  local estimated = A[2] == '-1'
  local rec = redis.call('HGET', K_RES, rid)
  if not rec then return {'err', 'unknown'} end
  local r = unpack_res(rec)
  if r.state == 'committed' then
    if r.est ~= estimated or (not estimated and (r.uts ~= A[2] or r.uns ~= A[3])) then
      return {'err', 'conflict'}
    end
    keep(A)
    return committed(r)
  end
  if r.state == 'released' then return {'err', 'released'} end
  -- Still waiting for its hold: there is nothing to commit yet.
  if r.state == 'waiting' then return {'err', 'unknown'} end
  local late = r.state == 'expired'
  local path = r.path
  local key = ACCT_PREFIX .. path
  local used = {t = r.t, n = r.n}
  if estimated then
    r.uts, r.uns = r.ts, r.ns
  else
    used.t, used.n = tonumber(A[2]), tonumber(A[3])
    r.uts, r.uns = A[2], A[3]
  end
  local a = acct(path)
  if not late then
    unhold(a, r)
    redis.call('ZREM', K_LEASES, rid)
  end
  local over = {t = 0, n = 0}
  if a.closed then
    -- Its leftover already went back up: the whole spend is beyond what it
    -- holds, and every closed ancestor passes it on to the first open one.
    for _, u in ipairs(UNITS) do
      if limited(a, u) then over[u] = used[u] end
    end
    -- Ancestors are written directly: the batch's copies go to Redis first.
    flush_cache()
    local p = a.parent
    while p ~= '' do
      local pk = ACCT_PREFIX .. p
      redis.call('HINCRBY', pk, 'ct', used.t)
      redis.call('HINCRBY', pk, 'cn', used.n)
      if redis.call('HGET', pk, 'closed') ~= '1' then break end
      p = redis.call('HGET', pk, 'parent')
    end
  end
  for _, u in ipairs(UNITS) do
    if limited(a, u) and not a.closed then
      local before = room(a, u)
      local after = before - used[u]
      over[u] = math.max(0, -after) - math.max(0, -before)
    end
  end
  a.st, a.sn = a.st + used.t, a.sn + used.n
  r.state, r.late, r.est = 'committed', late, estimated
  r.ots = over.t == 0 and '0' or int(over.t)
  r.ons = over.n == 0 and '0' or int(over.n)
  save_res(rid, r)
  keep(A)
  local tags = A[4]
  if tags == '' then tags = r.tags end
  local tail = '\31tags\31' .. tags .. '\31held_t\31' .. r.ts .. '\31held_n\31' .. r.ns
  if estimated then
    tail = tail .. '\31estimated\31' .. '1'
    redis.call('HINCRBY', key, 'nest', 1)
  end
  if late then
    tail = tail .. '\31late\31' .. '1'
    redis.call('HINCRBY', key, 'nlate', 1)
  end
  event('commit', path, r.uts, r.uns, rid, tail)
  if over.t > 0 or over.n > 0 then
    redis.call('HINCRBY', key, 'ot', over.t)
    redis.call('HINCRBY', key, 'on', over.n)
    event('overrun', path, over.t, over.n, rid, '\31tags\31' .. tags)
  end
  -- Money came back: waiters are served in the same step (and the counters saved).
  serve(a)
  return committed(r)
end
