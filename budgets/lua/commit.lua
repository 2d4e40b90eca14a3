-- commit: turn a reservation into spend with the usage actually reported.
-- Usage below the reservation returns the rest to the account; usage above what
-- the account can cover is still recorded (the money was spent) as an overrun.
-- A commit after the lease expired is recorded too and flagged late.
-- A[1] reservation id  A[2] used tokens  A[3] used nanos
-- (both -1: no usage was reported; charge the whole reservation, flagged estimated)
-- A[4] tags ('' none)
-- returns {'ok', path, used_tokens, used_nanos, overrun_tokens, overrun_nanos, late, estimated}
--      or {'err', 'unknown'} | {'err', 'released'} | {'err', 'conflict', op}
OPS['commit'] = function(A, K)
  local rid = A[1]
  local used = {t = tonumber(A[2]), n = tonumber(A[3])}
  local fp = A[2] .. '|' .. A[3]
  local estimated = used.t < 0
  local seen = redis.call('HMGET', K_OPS, 'c:' .. rid, 'r:' .. rid, 'x:' .. rid)
  if seen[1] then return replay(seen[1], fp) end
  if seen[2] then return {'err', 'released'} end
  local rec = redis.call('HGET', K_RES, rid)
  local late = 0
  if not rec then
    rec = seen[3]
    if not rec then return {'err', 'unknown'} end
    late = 1
  end
  local r = unpack_res(rec)
  local path, held = r[1], {t = r[2], n = r[3]}
  local key = ACCT_PREFIX .. path
  if estimated then used.t, used.n = held.t, held.n end
  local a = load(key)
  if late == 0 then
    a.rt, a.rn, a.nres = a.rt - held.t, a.rn - held.n, a.nres - 1
    redis.call('HDEL', K_RES, rid)
    redis.call('ZREM', K_LEASES, rid)
  end
  local over = {t = 0, n = 0}
  if a.closed then
    -- Its leftover already went back up: the whole spend is beyond what it
    -- holds, and every closed ancestor passes it on to the first open one.
    for _, u in ipairs(UNITS) do
      if limited(a, u) then over[u] = used[u] end
    end
    local p = a.parent
    while p ~= '' do
      local pk = ACCT_PREFIX .. p
      redis.call('HINCRBY', pk, 'ct', used.t)
      redis.call('HINCRBY', pk, 'cn', used.n)
      if redis.call('HGET', pk, 'closed') ~= '1' then break end
      p = redis.call('HGET', pk, 'parent')
    end
  end
  for _, u in ipairs(UNITS) do
    if limited(a, u) and not a.closed then
      local before = room(a, u)
      local after = before - used[u]
      over[u] = math.max(0, -after) - math.max(0, -before)
    end
  end
  redis.call('HSET', key, 'rt', a.rt, 'rn', a.rn, 'nres', a.nres, 'st', a.st + used.t, 'sn', a.sn + used.n)
  local tags = A[4]
  if tags == '' then tags = r[5] end
  local extra = {'tags', tags, 'held_t', held.t, 'held_n', held.n}
  if estimated then
    extra[#extra + 1] = 'estimated'; extra[#extra + 1] = 1
    redis.call('HINCRBY', key, 'nest', 1)
  end
  if late == 1 then
    extra[#extra + 1] = 'late'; extra[#extra + 1] = 1
    redis.call('HINCRBY', key, 'nlate', 1)
  end
  event('commit', path, used.t, used.n, rid, extra)
  if over.t > 0 or over.n > 0 then
    redis.call('HINCRBY', key, 'ot', over.t)
    redis.call('HINCRBY', key, 'on', over.n)
    event('overrun', path, over.t, over.n, rid, {'tags', tags})
  end
  return remember('c:' .. rid, fp, {'ok', path, used.t, used.n, over.t, over.n, late, estimated and 1 or 0})
end
