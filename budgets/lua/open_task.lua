-- open_task: create a task's root account with its limits.
-- KEYS[7] root account hash
-- ARGV[2] op id  ARGV[3] token limit (-1 unlimited)  ARGV[4] nano limit (-1 unlimited)
-- ARGV[5] tenant ('' none)  ARGV[6] funding period ('' none)  ARGV[7] task id
-- returns {'ok', created_ms} or {'err', 'exists'} | {'err', 'conflict', op}
local fp = ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5] .. '|' .. ARGV[6]
local prior = recall('o:' .. ARGV[2], fp)
if prior then return prior end
if redis.call('EXISTS', K_META) == 1 then return {'err', 'exists'} end
redis.call('HSET', K_META, 'task', ARGV[7], 'tenant', ARGV[5], 'period', ARGV[6],
  'lt', ARGV[3], 'ln', ARGV[4], 'status', 'open', 'created_ms', NOW, 'op', ARGV[2])
redis.call('HSET', KEYS[7], 'parent', '', 'closed', '0', 'lt', ARGV[3], 'ln', ARGV[4],
  'rt', 0, 'rn', 0, 'st', 0, 'sn', 0, 'at', 0, 'an', 0, 'ct', 0, 'cn', 0, 'ot', 0, 'on', 0,
  'nres', 0, 'nkids', 0, 'opened_ms', NOW)
redis.call('SADD', K_ACCTS, 'root')
event('open', 'root', ARGV[3], ARGV[4], ARGV[2], {'tenant', ARGV[5], 'period', ARGV[6]})
return remember('o:' .. ARGV[2], fp, {'ok', NOW})
