-- open_task: create a task's root account with its limits; with a tenant, open
-- the incarnation claim.lua claimed and the tenant funded.
-- K[1] root account hash
-- A[1] op id  A[2] incarnation  A[3] token limit (-1 unlimited)
-- A[4] nano limit (-1 unlimited)  A[5] tenant ('' none)  A[6] funding period ('' none)
-- A[7] task id
-- returns {'ok', created_ms, incarnation, status}; a repeat by the same op id
--   returns the task as it is (status 'open' or 'closed') and writes nothing
-- errors (budgets/replies.py OpenTaskError):
--   'exists' -> TaskExists          the task was created under another op id
--   'conflict' -> OperationConflict  the same op id with other limits or tenant
--   'unclaimed' -> OpenAborted       the claim this tenant funded is gone (undone)
OPS['open_task'] = function(A, K)
  local fp = A[3] .. '|' .. A[4] .. '|' .. A[5]
  local m = redis.call('HMGET', K_META, 'status', 'op', 'fp', 'inc', 'created_ms')
  if m[1] then
    if m[2] ~= A[1] then return {'err', 'exists'} end
    if m[3] ~= fp then return {'err', 'conflict'} end
    if m[1] ~= 'claimed' then return {'ok', tonumber(m[5]), m[4], m[1]} end
    if m[4] ~= A[2] then return {'err', 'unclaimed'} end
  elseif A[5] ~= '' then
    return {'err', 'unclaimed'}
  end
  redis.call('HSET', K_META, 'task', A[7], 'tenant', A[5], 'period', A[6],
    'lt', A[3], 'ln', A[4], 'status', 'open', 'created_ms', NOW, 'op', A[1], 'fp', fp, 'inc', A[2])
  redis.call('HSET', K[1], 'parent', '', 'closed', '0', 'lt', A[3], 'ln', A[4],
    'rt', 0, 'rn', 0, 'st', 0, 'sn', 0, 'at', 0, 'an', 0, 'ct', 0, 'cn', 0, 'ot', 0, 'on', 0,
    'nres', 0, 'nkids', 0, 'opened_ms', NOW)
  redis.call('SADD', K_ACCTS, ROOT)
  event('open', ROOT, A[3], A[4], A[1],
    '\31tenant\31' .. A[5] .. '\31period\31' .. A[6] .. '\31inc\31' .. A[2])
  return {'ok', NOW, A[2], 'open'}
end
