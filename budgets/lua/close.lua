-- close: return everything an account did not spend to its parent and seal it.
-- With force, open reservations are expired first: a call still in flight can
-- commit late and its spend is still recorded (and charged upward).
-- K[1] account hash  K[2] parent hash (absent for the root)
-- A[1] account path  A[2] '1' to force
-- returns {'ok', returned_tokens, returned_nanos, spent_tokens, spent_nanos}
--      (returned is -1 in a unit the account did not limit)
--      or {'err', 'no_account', path} | {'err', 'busy', open_children, open_reservations}
OPS['close'] = function(A, K)
  local path = A[1]
  local prior = recall('z:' .. path, '')
  if prior then return prior end
  local a = load(K[1])
  if not a then return {'err', 'no_account', path} end
  if a.nkids > 0 or (a.nres > 0 and A[2] ~= '1') then
    return {'err', 'busy', a.nkids, a.nres}
  end
  if a.nres > 0 then
    local all = redis.call('HGETALL', K_RES)
    for i = 1, #all, 2 do
      local r = unpack_res(all[i + 1])
      if r[1] == path then
        drop_hold(r[1], r[2], r[3])
        redis.call('HDEL', K_RES, all[i])
        redis.call('ZREM', K_LEASES, all[i])
        redis.call('HSET', K_OPS, 'x:' .. all[i], all[i + 1])
        event('expire', r[1], r[2], r[3], all[i], {'tags', r[5], 'reason', 'closed'})
      end
    end
    a = load(K[1])
  end
  local spent = {t = a.st + a.ct, n = a.sn + a.cn}
  local back = {t = -1, n = -1}
  for _, u in ipairs(UNITS) do
    if limited(a, u) then back[u] = math.max(0, a['l' .. u] - spent[u]) end
  end
  redis.call('HSET', K[1], 'closed', '1', 'closed_ms', NOW)
  if a.parent ~= '' then
    for _, u in ipairs(UNITS) do
      if limited(a, u) then redis.call('HINCRBY', K[2], 'a' .. u, 0 - a['l' .. u]) end
      redis.call('HINCRBY', K[2], 'c' .. u, spent[u])
    end
    redis.call('HINCRBY', K[2], 'nkids', -1)
  else
    redis.call('HSET', K_META, 'status', 'closed', 'closed_ms', NOW)
  end
  event('close', path, back.t, back.n, 'z:' .. path, {'spent_t', spent.t, 'spent_n', spent.n})
  return remember('z:' .. path, '', {'ok', back.t, back.n, spent.t, spent.n})
end
