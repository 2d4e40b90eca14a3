-- open: carve a child account out of its parent's available budget.
-- K[1] parent account hash  K[2] child account hash
-- A[1] marker (the op id's ops field)  A[2] parent path  A[3] child path
-- A[4] token limit (-1 unlimited)  A[5] nano limit (-1 unlimited)  A[6] tags ('' none)
-- A[7] op id (for the event)
-- returns {'ok', parent_available_tokens, parent_available_nanos}
-- errors (budgets/replies.py OpenError):
--   'no_task' -> UnknownTask              the parent is the root and there is none
--   'no_account' -> UnknownAccount        {.., parent path}
--   'closed' -> AccountClosed             {.., parent path}
--   'exists' -> AccountExists             {.., child path}
--   'unlimited' -> UnlimitedChild         {.., child path, unit}
--   'insufficient' -> BudgetExceeded      {.., parent path, unit, requested, available}
--   'conflict' -> OperationConflict       the op id was used with other arguments
OPS['open'] = function(A, K)
  local ppath, cpath = A[2], A[3]
  local want = {t = tonumber(A[4]), n = tonumber(A[5])}
  local fp = ppath .. '|' .. cpath .. '|' .. A[4] .. '|' .. A[5]
  local prior = kept(A[1])
  if prior then
    if prior[1] ~= fp then return {'err', 'conflict'} end
    return prior[2]
  end
  local p = load(K[1])
  if not p then
    if ppath == ROOT then return {'err', 'no_task'} end
    return {'err', 'no_account', ppath}
  end
  if p.closed then return {'err', 'closed', ppath} end
  if redis.call('EXISTS', K[2]) == 1 then return {'err', 'exists', cpath} end
  local carve = {t = 0, n = 0}
  for _, u in ipairs(UNITS) do
    if want[u] < 0 then
      if limited(p, u) then return {'err', 'unlimited', cpath, UNIT_NAME[u]} end
    else
      if limited(p, u) and want[u] > room(p, u) then
        return {'err', 'insufficient', ppath, UNIT_NAME[u], want[u], math.max(0, room(p, u))}
      end
      carve[u] = want[u]
    end
  end
  redis.call('HINCRBY', K[1], 'at', carve.t)
  redis.call('HINCRBY', K[1], 'an', carve.n)
  redis.call('HINCRBY', K[1], 'nkids', 1)
  redis.call('HSET', K[2], 'parent', ppath, 'closed', '0', 'lt', A[4], 'ln', A[5],
    'rt', 0, 'rn', 0, 'st', 0, 'sn', 0, 'at', 0, 'an', 0, 'ct', 0, 'cn', 0, 'ot', 0, 'on', 0,
    'nres', 0, 'nkids', 0, 'opened_ms', NOW)
  redis.call('SADD', K_ACCTS, cpath)
  event('open', cpath, A[4], A[5], A[7], '\31parent\31' .. ppath .. '\31tags\31' .. A[6])
  p.at, p.an = p.at + carve.t, p.an + carve.n
  return remember(A[1], fp, {'ok', shown(p, 't'), shown(p, 'n')})
end
