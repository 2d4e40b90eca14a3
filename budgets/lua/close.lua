-- close: return everything an account did not spend to its parent and seal it.
-- With force, open reservations are expired first: a call still in flight can
-- commit late and its spend is still recorded (and charged upward).
-- K[1] account hash  K[2] parent hash (absent for the root)
-- A[1] account path  A[2] '1' to force  A[3] marker (the close's ops field and event id)
-- A[4] work id to save a result under in the results hash ('' none)  A[5] the result,
--   saved as given when the close succeeds (a repeat saves it too): a subtask's try
--   is closed and its result kept in one step
-- returns {'ok', returned_tokens, returned_nanos, spent_tokens, spent_nanos}
--      (returned is -1 in a unit the account did not limit); a repeat returns the first
-- errors (budgets/replies.py CloseError):
--   'no_task' -> UnknownTask              the account is the root and there is none
--   'no_account' -> UnknownAccount        {.., path}
--   'busy' -> AccountBusy                 {.., path, open children, open reservations}
local function save_result(A)
  if A[4] ~= nil and A[4] ~= '' then redis.call('HSET', K_RESULTS, A[4], A[5]) end
end

OPS['close'] = function(A, K)
  local path = A[1]
  local prior = kept(A[3])
  if prior then
    save_result(A)
    return prior[2]
  end
  local a = load(K[1])
  if not a then
    if path == ROOT then return {'err', 'no_task'} end
    return {'err', 'no_account', path}
  end
  if a.nkids > 0 or (a.nres > 0 and A[2] ~= '1') then
    return {'err', 'busy', path, a.nkids, a.nres}
  end
  if a.nres > 0 or a.nwait > 0 then
    a.path = path
    local ids = redis.call('ZRANGE', K_LEASES, 0, -1)
    local recs = redis.call('HMGET', K_RES, unpack(ids))
    local gone = {}
    for i, id in ipairs(ids) do
      if recs[i] then
        local r = unpack_res(recs[i])
        if r.path == path and r.state == 'held' then
          expire_res(a, id, r, '\31tags\31' .. r.tags .. '\31reason\31closed')
          gone[#gone + 1] = id
        elseif r.path == path and r.state == 'waiting' then
          unwait(a, id, r, 'closed')
        end
      end
    end
    if #gone > 0 then redis.call('ZREM', K_LEASES, unpack(gone)) end
    redis.call('DEL', WAIT_PREFIX .. path)
    save_holds(a)
  end
  local spent = {t = a.st + a.ct, n = a.sn + a.cn}
  local back = {t = -1, n = -1}
  for _, u in ipairs(UNITS) do
    if limited(a, u) then back[u] = math.max(0, a[F[u].l] - spent[u]) end
  end
  redis.call('HSET', K[1], 'closed', '1', 'closed_ms', NOW)
  if a.parent ~= '' then
    for _, u in ipairs(UNITS) do
      if limited(a, u) then redis.call('HINCRBY', K[2], F[u].a, 0 - a[F[u].l]) end
      redis.call('HINCRBY', K[2], F[u].c, spent[u])
    end
    redis.call('HINCRBY', K[2], 'nkids', -1)
  else
    redis.call('HSET', K_META, 'status', 'closed', 'closed_ms', NOW)
  end
  event('close', path, back.t, back.n, A[3],
    '\31spent_t\31' .. int(spent.t) .. '\31spent_n\31' .. int(spent.n))
  save_result(A)
  return remember(A[3], '', {'ok', back.t, back.n, spent.t, spent.n})
end
