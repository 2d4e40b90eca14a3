-- open_task: create a task's root account with its limits.
-- K[1] root account hash
-- A[1] op id  A[2] token limit (-1 unlimited)  A[3] nano limit (-1 unlimited)
-- A[4] tenant ('' none)  A[5] funding period ('' none)  A[6] task id
-- returns {'ok', created_ms} or {'err', 'exists'} | {'err', 'conflict', op}
OPS['open_task'] = function(A, K)
  local fp = A[2] .. '|' .. A[3] .. '|' .. A[4] .. '|' .. A[5]
  local prior = recall('o:' .. A[1], fp)
  if prior then return prior end
  if redis.call('EXISTS', K_META) == 1 then return {'err', 'exists'} end
  redis.call('HSET', K_META, 'task', A[6], 'tenant', A[4], 'period', A[5],
    'lt', A[2], 'ln', A[3], 'status', 'open', 'created_ms', NOW, 'op', A[1])
  redis.call('HSET', K[1], 'parent', '', 'closed', '0', 'lt', A[2], 'ln', A[3],
    'rt', 0, 'rn', 0, 'st', 0, 'sn', 0, 'at', 0, 'an', 0, 'ct', 0, 'cn', 0, 'ot', 0, 'on', 0,
    'nres', 0, 'nkids', 0, 'opened_ms', NOW)
  redis.call('SADD', K_ACCTS, 'root')
  event('open', 'root', A[2], A[3], A[1], {'tenant', A[4], 'period', A[5]})
  return remember('o:' .. A[1], fp, {'ok', NOW})
end
