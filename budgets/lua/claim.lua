-- claim: take a task id for one incarnation before its tenant funds it (the
-- funding saga's first step; open_task is its last). Writes meta with status
-- 'claimed', no event: a claim given back (unclaim) leaves nothing behind.
-- A[1] op id  A[2] incarnation (kept if this call claims)
-- A[3] token limit (-1 unlimited)  A[4] nano limit (-1 unlimited)  A[5] tenant
-- A[6] task id
-- returns {'ok', status, incarnation}: status 'claimed' (fund this incarnation,
--   then open it), or 'open' / 'closed' (this op id already opened it)
-- errors (budgets/replies.py ClaimError):
--   'exists' -> TaskExists          the task was created under another op id
--   'conflict' -> OperationConflict  the same op id with other limits or tenant
OPS['claim'] = function(A, K)
  local fp = A[3] .. '|' .. A[4] .. '|' .. A[5]
  local m = redis.call('HMGET', K_META, 'status', 'op', 'fp', 'inc')
  if m[1] then
    if m[2] ~= A[1] then return {'err', 'exists'} end
    if m[3] ~= fp then return {'err', 'conflict'} end
    return {'ok', m[1], m[4]}
  end
  redis.call('HSET', K_META, 'task', A[6], 'tenant', A[5], 'lt', A[3], 'ln', A[4],
    'status', 'claimed', 'op', A[1], 'fp', fp, 'inc', A[2], 'claimed_ms', NOW)
  return {'ok', 'claimed', A[2]}
end
