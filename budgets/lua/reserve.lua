-- reserve: hold tokens and nano-dollars on one account for one call, under a lease.
-- K[1] account hash
-- A[1] account path  A[2] reservation id  A[3] tokens  A[4] nanos
-- A[5] lease ms      A[6] tags (JSON text, '' for none)
-- returns {'ok', deadline_ms, available_tokens, available_nanos} (-1 = unlimited)
--      or {'err', 'insufficient', unit, requested, available}
--      or {'err', 'no_account', path} | {'err', 'closed'} | {'err', 'conflict', op}
OPS['reserve'] = function(A, K)
  local path, rid = A[1], A[2]
  local want = {t = tonumber(A[3]), n = tonumber(A[4])}
  local fp = path .. '|' .. A[3] .. '|' .. A[4]
  local seen = redis.call('HMGET', K_OPS, 'v:' .. rid, 'x:' .. rid, 'c:' .. rid)
  if seen[1] then return replay(seen[1], fp) end
  if seen[2] or seen[3] then return {'err', 'conflict', 'v:' .. rid} end
  local a = load(K[1])
  if not a then return {'err', 'no_account', path} end
  if a.closed then return {'err', 'closed'} end
  for _, u in ipairs(UNITS) do
    if limited(a, u) and want[u] > room(a, u) then
      return {'err', 'insufficient', UNIT_NAME[u], want[u], math.max(0, room(a, u))}
    end
  end
  local deadline = NOW + tonumber(A[5])
  a.rt, a.rn = a.rt + want.t, a.rn + want.n
  redis.call('HSET', K[1], 'rt', a.rt, 'rn', a.rn, 'nres', a.nres + 1)
  redis.call('HSET', K_RES, rid, pack_res(path, A[3], A[4], deadline, A[6]))
  redis.call('ZADD', K_LEASES, deadline, rid)
  event('reserve', path, A[3], A[4], rid, {'tags', A[6], 'deadline', deadline})
  return remember('v:' .. rid, fp, {'ok', deadline, shown(a, 't'), shown(a, 'n')})
end
