-- tenant_settle: a task ended; its funding stops counting and its spend counts.
-- KEYS[1] period hash  KEYS[2] tenant ops hash  KEYS[3] tenant events stream
-- ARGV[1] op id  ARGV[2] task id  ARGV[3] funded tokens  ARGV[4] funded nanos
-- ARGV[5] spent tokens  ARGV[6] spent nanos   (funded is -1 where unlimited)
-- ARGV[7] period id
-- returns {'ok'} (a repeated op id changes nothing)
if redis.call('HEXISTS', KEYS[2], 's:' .. ARGV[1]) == 1 then return {'ok'} end
redis.call('HINCRBY', KEYS[1], 'ft', 0 - math.max(0, tonumber(ARGV[3])))
redis.call('HINCRBY', KEYS[1], 'fn', 0 - math.max(0, tonumber(ARGV[4])))
redis.call('HINCRBY', KEYS[1], 'st', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'sn', ARGV[6])
redis.call('XADD', KEYS[3], '*', 'op', 'settle', 'task', ARGV[2], 'period', ARGV[7],
  't', ARGV[5], 'n', ARGV[6], 'id', ARGV[1])
redis.call('HSET', KEYS[2], 's:' .. ARGV[1], '1')
return {'ok'}
