-- release: drop a reservation without spending it (the call failed or was not made).
-- A[1] reservation id  A[2] reason (free text for the audit trail)
-- returns {'ok', path, tokens, nanos, expired} (expired = 1 when the lease had already run out)
--      or {'err', 'unknown'} | {'err', 'committed'}
OPS['release'] = function(A, K)
  local rid = A[1]
  local prior = recall('r:' .. rid, '')
  if prior then return prior end
  if redis.call('HEXISTS', K_OPS, 'c:' .. rid) == 1 then return {'err', 'committed'} end
  local rec = redis.call('HGET', K_RES, rid)
  if not rec then
    local gone = redis.call('HGET', K_OPS, 'x:' .. rid)
    if not gone then return {'err', 'unknown'} end
    local g = unpack_res(gone)
    return {'ok', g[1], g[2], g[3], 1}
  end
  local r = unpack_res(rec)
  drop_hold(r[1], r[2], r[3])
  redis.call('HDEL', K_RES, rid)
  redis.call('ZREM', K_LEASES, rid)
  event('release', r[1], r[2], r[3], rid, {'tags', r[5], 'reason', A[2]})
  return remember('r:' .. rid, '', {'ok', r[1], r[2], r[3], 0})
end
