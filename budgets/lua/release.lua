-- release: drop a reservation without spending it (the call failed or was not made).
-- A[1] reservation id  A[2] reason (free text for the audit trail)
-- returns {'ok', path, tokens, nanos, expired}: expired = 1 when the lease had already
--   run out (the hold was gone; nothing is written and a late commit stays possible)
-- errors (budgets/replies.py ReleaseError):
--   'unknown' -> UnknownReservation      the id was never reserved
--   'committed' -> ReservationSettled    it was committed
-- A reservation still waiting is withdrawn: it leaves the queue, its record goes
-- (a reserve with its id later is evaluated afresh), and {'ok', path, 0, 0, 0} is returned.
OPS['release'] = function(A, K)
  local rid = A[1]
  local rec = redis.call('HGET', K_RES, rid)
  if not rec then return {'err', 'unknown'} end
  local r = unpack_res(rec)
  if r.state == 'committed' then return {'err', 'committed'} end
  if r.state == 'expired' then return {'ok', r.path, r.t, r.n, 1} end
  if r.state == 'waiting' then
    withdraw_res(rid, r, A[2])
    return {'ok', r.path, 0, 0, 0}
  end
  if r.state == 'held' then
    local a = acct(r.path)
    unhold(a, r)
    r.state = 'released'
    save_res(rid, r)
    redis.call('ZREM', K_LEASES, rid)
    event('release', r.path, r.t, r.n, rid, '\31tags\31' .. r.tags .. '\31reason\31' .. A[2])
    serve(a)
  end
  return {'ok', r.path, r.t, r.n, 0}
end
