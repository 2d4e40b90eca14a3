-- reserve: hold tokens and nano-dollars on one account for one call, under a lease.
-- KEYS[7] account hash
-- ARGV[2] account path  ARGV[3] reservation id  ARGV[4] tokens  ARGV[5] nanos
-- ARGV[6] lease ms      ARGV[7] tags (JSON text, '' for none)
-- returns {'ok', deadline_ms, available_tokens, available_nanos} (-1 = unlimited)
--      or {'err', 'insufficient', unit, requested, available}
--      or {'err', 'no_account', path} | {'err', 'closed'} | {'err', 'conflict', op}
local path, rid = ARGV[2], ARGV[3]
local want = {t = tonumber(ARGV[4]), n = tonumber(ARGV[5])}
local fp = path .. '|' .. ARGV[4] .. '|' .. ARGV[5]
local prior = recall('v:' .. rid, fp)
if prior then return prior end
if redis.call('HEXISTS', K_OPS, 'x:' .. rid) == 1 or redis.call('HEXISTS', K_OPS, 'c:' .. rid) == 1 then
  return {'err', 'conflict', 'v:' .. rid}
end
sweep(64)
local a = load(KEYS[7])
if not a then return {'err', 'no_account', path} end
if a.closed then return {'err', 'closed'} end
for _, u in ipairs(UNITS) do
  if limited(a, u) and want[u] > room(a, u) then
    return {'err', 'insufficient', UNIT_NAME[u], want[u], math.max(0, room(a, u))}
  end
end
local deadline = NOW + tonumber(ARGV[6])
redis.call('HINCRBY', KEYS[7], 'rt', ARGV[4])
redis.call('HINCRBY', KEYS[7], 'rn', ARGV[5])
redis.call('HINCRBY', KEYS[7], 'nres', 1)
redis.call('HSET', K_RES, rid, pack_res(path, ARGV[4], ARGV[5], deadline, ARGV[7]))
redis.call('ZADD', K_LEASES, deadline, rid)
event('reserve', path, ARGV[4], ARGV[5], rid, {'tags', ARGV[7], 'deadline', deadline})
a.rt, a.rn = a.rt + want.t, a.rn + want.n
return remember('v:' .. rid, fp, {'ok', deadline, shown(a, 't'), shown(a, 'n')})
