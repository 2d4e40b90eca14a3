-- reserve: hold tokens and nano-dollars on one account for one call, under a lease.
-- K[1] account hash
-- A[1] account path  A[2] reservation id  A[3] tokens  A[4] nanos
-- A[5] lease ms      A[6] tags (JSON text, '' for none)
-- returns {'ok', deadline_ms}; a repeat with the same id returns the same, in any state
-- errors (budgets/replies.py ReserveError):
--   'no_task' -> UnknownTask              the account is the root and there is none
--   'no_account' -> UnknownAccount        {.., path}
--   'closed' -> AccountClosed             {.., path}
--   'insufficient' -> BudgetExceeded      {.., path, unit, requested, available}
--   'conflict' -> OperationConflict       the id was reserved with other amounts
OPS['reserve'] = function(A, K)
  local path, rid = A[1], A[2]
  local want = {t = tonumber(A[3]), n = tonumber(A[4])}
  local rec = redis.call('HGET', K_RES, rid)
  if rec then
    local r = unpack_res(rec)
    if r.path ~= path or r.ts ~= A[3] or r.ns ~= A[4] then return {'err', 'conflict'} end
    return {'ok', tonumber(r.ds)}
  end
  local a = load(K[1])
  if not a then
    if path == ROOT then return {'err', 'no_task'} end
    return {'err', 'no_account', path}
  end
  if a.closed then return {'err', 'closed', path} end
  for _, u in ipairs(UNITS) do
    if limited(a, u) and want[u] > room(a, u) then
      return {'err', 'insufficient', path, UNIT_NAME[u], want[u], math.max(0, room(a, u))}
    end
  end
  local deadline = NOW + tonumber(A[5])
  redis.call('HSET', K[1], 'rt', a.rt + want.t, 'rn', a.rn + want.n, 'nres', a.nres + 1)
  save_res(rid, {state = 'held', path = path, ts = A[3], ns = A[4], ds = int(deadline),
    uts = '0', uns = '0', ots = '0', ons = '0', late = false, est = false, tags = A[6]})
  redis.call('ZADD', K_LEASES, deadline, rid)
  event('reserve', path, A[3], A[4], rid, {'tags', A[6], 'deadline', deadline})
  return {'ok', deadline}
end
