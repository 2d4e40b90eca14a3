-- transfer: move unallocated budget between a parent and a child, or between
-- two siblings through their parent. Never takes more than the source has
-- available (so never below what it has spent, reserved or carved).
-- K[1] source account hash  K[2] destination account hash
-- K[3] the common parent hash (siblings only)
-- A[1] marker (the op id's ops field)  A[2] source path  A[3] destination path
-- A[4] tokens  A[5] nanos  A[6] 'down' | 'up' | 'across'  A[7] op id (for the event)
--   (A[4] and A[5] both 'all': everything the source has available, in each unit it
--   limits; when that is nothing, nothing is written and no event is made)
-- returns {'ok', src_available_tokens, src_available_nanos, dst_available_tokens, dst_available_nanos}
-- errors (budgets/replies.py TransferError):
--   'no_task' -> UnknownTask              the root is named and there is none
--   'no_account' -> UnknownAccount        {.., path}
--   'closed' -> AccountClosed             {.., source path}
--   'relation' -> InvalidTransfer         {.., source, destination}: not parent/child or siblings
--   'unlimited' -> UnlimitedChild         {.., source path, unit}
--   'insufficient' -> BudgetExceeded      {.., source path, unit, requested, available}
--   'conflict' -> OperationConflict       the op id was used with other arguments
OPS['transfer'] = function(A, K)
  local spath, dpath, dir = A[2], A[3], A[6]
  local all = A[4] == 'all'
  local amt = {t = tonumber(A[4]) or 0, n = tonumber(A[5]) or 0}
  local fp = spath .. '|' .. dpath .. '|' .. A[4] .. '|' .. A[5]
  local prior = kept(A[1])
  if prior then
    if prior[1] ~= fp then return {'err', 'conflict'} end
    return prior[2]
  end
  local s, d = load(K[1]), load(K[2])
  for _, pair in ipairs({{s, spath}, {d, dpath}}) do
    if not pair[1] then
      if pair[2] == ROOT then return {'err', 'no_task'} end
      return {'err', 'no_account', pair[2]}
    end
  end
  if s.closed or d.closed then return {'err', 'closed', spath} end
  if all then
    for _, u in ipairs(UNITS) do
      if limited(s, u) then amt[u] = math.max(0, room(s, u)) end
    end
    if amt.t == 0 and amt.n == 0 then
      return remember(A[1], fp, {'ok', shown(s, 't'), shown(s, 'n'), shown(d, 't'), shown(d, 'n')})
    end
  end
  local mid = nil
  if dir == 'down' then
    if d.parent ~= spath then return {'err', 'relation', spath, dpath} end
  elseif dir == 'up' then
    if s.parent ~= dpath then return {'err', 'relation', spath, dpath} end
  else
    if s.parent ~= d.parent or s.parent == '' then return {'err', 'relation', spath, dpath} end
    mid = load(K[3])
    if not mid or mid.closed then return {'err', 'closed', spath} end
  end
  for _, u in ipairs(UNITS) do
    if amt[u] > 0 then
      -- The receiving limit must be a number to grow, and an upward move must
      -- come out of a limit (a child of a limited parent is always limited).
      if not limited(d, u) or not limited(s, u) and dir ~= 'down' then
        return {'err', 'unlimited', spath, UNIT_NAME[u]}
      end
      if limited(s, u) and amt[u] > room(s, u) then
        return {'err', 'insufficient', spath, UNIT_NAME[u], amt[u], math.max(0, room(s, u))}
      end
    end
  end
  local parent_key = K[1]
  if dir == 'up' then parent_key = K[2] elseif dir == 'across' then parent_key = K[3] end
  for _, u in ipairs(UNITS) do
    if amt[u] > 0 then
      if dir == 'down' then
        redis.call('HINCRBY', K[1], F[u].a, amt[u])
        redis.call('HINCRBY', K[2], F[u].l, amt[u])
      else
        -- up or across: the source gives back part of its limit to the parent;
        -- across, the parent carves it straight into the destination.
        redis.call('HINCRBY', K[1], F[u].l, 0 - amt[u])
        if dir == 'up' then
          redis.call('HINCRBY', parent_key, F[u].a, 0 - amt[u])
        else
          redis.call('HINCRBY', K[2], F[u].l, amt[u])
        end
      end
    end
  end
  event('transfer', spath, amt.t, amt.n, A[7], '\31to\31' .. dpath .. '\31dir\31' .. dir)
  s, d = load(K[1]), load(K[2])
  if d.nwait > 0 then
    -- Money came in: the destination's waiters are served in the same step.
    d.path = dpath
    serve(d)
  end
  return remember(A[1], fp, {'ok', shown(s, 't'), shown(s, 'n'), shown(d, 't'), shown(d, 'n')})
end
