-- reserve: hold tokens and nano-dollars on one account for one call, under a lease.
-- When the ask does not fit only because other calls' holds are in flight (it
-- would fit if they came back unspent) and A[7] allows a wait, the reservation
-- waits instead: it joins the account's queue and is granted, oldest first, by
-- the operation that settles enough money (or ends when its wait does).
-- No K: the account is read through the batch's copy (acct(A[1])).
-- A[1] account path  A[2] reservation id  A[3] tokens  A[4] nanos
-- A[5] lease ms      A[6] tags (JSON text, '' for none)
-- A[7] longest wait ms (0: refuse instead of waiting)
-- returns {'ok', deadline_ms, 'held'}, or {'ok', wait_deadline_ms, 'waiting'} when it
--   waits; a repeat with the same id returns the same, in any state
-- errors (budgets/replies.py ReserveError):
--   'no_task' -> UnknownTask              the account is the root and there is none
--   'no_account' -> UnknownAccount        {.., path}
--   'closed' -> AccountClosed             {.., path}
--   'insufficient' -> BudgetExceeded      {.., path, unit, requested, available}
--   'conflict' -> OperationConflict       the id was reserved with other amounts
local function replay(rec, A)
  local r = unpack_res(rec)
  if r.path ~= A[1] or r.ts ~= A[3] or r.ns ~= A[4] then return {'err', 'conflict'} end
  if r.state == 'waiting' then return {'ok', tonumber(r.ds), 'waiting'} end
  return {'ok', tonumber(r.ds), 'held'}
end

OPS['reserve'] = function(A, K)
  local path, rid = A[1], A[2]
  local want = {t = tonumber(A[3]), n = tonumber(A[4])}
  local a = acct(path)
  if not a then
    if path == ROOT then return {'err', 'no_task'} end
    return {'err', 'no_account', path}
  end
  local verdict = 'closed'
  if not a.closed then verdict = admit(a, want, false) end
  if verdict == 'fits' then
    local deadline = NOW + tonumber(A[5])
    local ds = int(deadline)
    local rec = {state = 'held', path = path, ts = A[3], ns = A[4], ds = ds,
      uts = '0', uns = '0', ots = '0', ons = '0', late = false, est = false, tags = A[6]}
    -- Written only if the id is new; otherwise this is a repeat and nothing is written.
    if redis.call('HSETNX', K_RES, rid, pack_res(rec)) == 0 then
      return replay(redis.call('HGET', K_RES, rid), A)
    end
    hold(a, want.t, want.n)
    save_holds(a)
    redis.call('ZADD', K_LEASES, deadline, rid)
    event('reserve', path, A[3], A[4], rid, '\31tags\31' .. A[6] .. '\31deadline\31' .. ds)
    return {'ok', deadline, 'held'}
  end
  local prior = redis.call('HGET', K_RES, rid)
  if prior then return replay(prior, A) end
  if verdict == 'closed' then return {'err', 'closed', path} end
  local wait_ms = tonumber(A[7]) or 0
  if verdict == 'spent' or wait_ms <= 0 then
    for _, u in ipairs(UNITS) do
      if limited(a, u) and want[u] > room(a, u) - a[F[u].w] then
        return {'err', 'insufficient', path, UNIT_NAME[u], want[u], open_room(a, u)}
      end
    end
  end
  local until_ms = NOW + wait_ms
  save_res(rid, {state = 'waiting', path = path, ts = A[3], ns = A[4], ds = int(until_ms),
    uts = A[5], uns = int(NOW), ots = '0', ons = '0', late = false, est = false, tags = A[6]})
  a.nwait, a.wt, a.wn = a.nwait + 1, a.wt + want.t, a.wn + want.n
  save_holds(a)
  redis.call('RPUSH', WAIT_PREFIX .. path, rid)
  redis.call('ZADD', K_LEASES, until_ms, rid)
  event('wait', path, A[3], A[4], rid, '\31tags\31' .. A[6] .. '\31until\31' .. int(until_ms))
  return {'ok', until_ms, 'waiting'}
end
