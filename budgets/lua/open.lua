-- open: carve a child account out of its parent's available budget.
-- KEYS[7] parent account hash  KEYS[8] child account hash
-- ARGV[2] op id  ARGV[3] parent path  ARGV[4] child path
-- ARGV[5] token limit (-1 unlimited)  ARGV[6] nano limit (-1 unlimited)  ARGV[7] tags ('' none)
-- returns {'ok', parent_available_tokens, parent_available_nanos}
--      or {'err', 'no_account', path} | {'err', 'closed'} | {'err', 'exists'}
--      | {'err', 'unlimited', unit} | {'err', 'insufficient', unit, requested, available}
--      | {'err', 'conflict', op}
local ppath, cpath = ARGV[3], ARGV[4]
local want = {t = tonumber(ARGV[5]), n = tonumber(ARGV[6])}
local fp = ppath .. '|' .. cpath .. '|' .. ARGV[5] .. '|' .. ARGV[6]
local prior = recall('o:' .. ARGV[2], fp)
if prior then return prior end
sweep(64)
local p = load(KEYS[7])
if not p then return {'err', 'no_account', ppath} end
if p.closed then return {'err', 'closed'} end
if redis.call('EXISTS', KEYS[8]) == 1 then return {'err', 'exists'} end
local carve = {t = 0, n = 0}
for _, u in ipairs(UNITS) do
  if want[u] < 0 then
    if limited(p, u) then return {'err', 'unlimited', UNIT_NAME[u]} end
  else
    if limited(p, u) and want[u] > room(p, u) then
      return {'err', 'insufficient', UNIT_NAME[u], want[u], math.max(0, room(p, u))}
    end
    carve[u] = want[u]
  end
end
redis.call('HINCRBY', KEYS[7], 'at', carve.t)
redis.call('HINCRBY', KEYS[7], 'an', carve.n)
redis.call('HINCRBY', KEYS[7], 'nkids', 1)
redis.call('HSET', KEYS[8], 'parent', ppath, 'closed', '0', 'lt', ARGV[5], 'ln', ARGV[6],
  'rt', 0, 'rn', 0, 'st', 0, 'sn', 0, 'at', 0, 'an', 0, 'ct', 0, 'cn', 0, 'ot', 0, 'on', 0,
  'nres', 0, 'nkids', 0, 'opened_ms', NOW)
redis.call('SADD', K_ACCTS, cpath)
event('open', cpath, ARGV[5], ARGV[6], ARGV[2], {'parent', ppath, 'tags', ARGV[7]})
p.at, p.an = p.at + carve.t, p.an + carve.n
return remember('o:' .. ARGV[2], fp, {'ok', shown(p, 't'), shown(p, 'n')})
