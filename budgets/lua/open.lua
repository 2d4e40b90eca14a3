-- open: carve a child account out of its parent's available budget.
-- K[1] parent account hash  K[2] child account hash
-- A[1] op id  A[2] parent path  A[3] child path
-- A[4] token limit (-1 unlimited)  A[5] nano limit (-1 unlimited)  A[6] tags ('' none)
-- returns {'ok', parent_available_tokens, parent_available_nanos}
--      or {'err', 'no_account', path} | {'err', 'closed'} | {'err', 'exists'}
--      | {'err', 'unlimited', unit} | {'err', 'insufficient', unit, requested, available}
--      | {'err', 'conflict', op}
OPS['open'] = function(A, K)
  local ppath, cpath = A[2], A[3]
  local want = {t = tonumber(A[4]), n = tonumber(A[5])}
  local fp = ppath .. '|' .. cpath .. '|' .. A[4] .. '|' .. A[5]
  local prior = recall('o:' .. A[1], fp)
  if prior then return prior end
  local p = load(K[1])
  if not p then return {'err', 'no_account', ppath} end
  if p.closed then return {'err', 'closed'} end
  if redis.call('EXISTS', K[2]) == 1 then return {'err', 'exists'} end
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
  redis.call('HINCRBY', K[1], 'at', carve.t)
  redis.call('HINCRBY', K[1], 'an', carve.n)
  redis.call('HINCRBY', K[1], 'nkids', 1)
  redis.call('HSET', K[2], 'parent', ppath, 'closed', '0', 'lt', A[4], 'ln', A[5],
    'rt', 0, 'rn', 0, 'st', 0, 'sn', 0, 'at', 0, 'an', 0, 'ct', 0, 'cn', 0, 'ot', 0, 'on', 0,
    'nres', 0, 'nkids', 0, 'opened_ms', NOW)
  redis.call('SADD', K_ACCTS, cpath)
  event('open', cpath, A[4], A[5], A[1], {'parent', ppath, 'tags', A[6]})
  p.at, p.an = p.at + carve.t, p.an + carve.n
  return remember('o:' .. A[1], fp, {'ok', shown(p, 't'), shown(p, 'n')})
end
