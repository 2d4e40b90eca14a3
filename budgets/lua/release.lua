-- release: drop a reservation without spending it (the call failed or was not made).
-- A[1] reservation id  A[2] reason (free text for the audit trail)
-- returns {'ok', path, tokens, nanos, expired}: expired = 1 when the lease had already
--   run out (the hold was gone; nothing is written and a late commit stays possible)
-- errors (budgets/replies.py ReleaseError):
--   'unknown' -> UnknownReservation      the id was never reserved
--   'committed' -> ReservationSettled    it was committed
OPS['release'] = function(A, K)
  local rid = A[1]
  local rec = redis.call('HGET', K_RES, rid)
  if not rec then return {'err', 'unknown'} end
  local r = unpack_res(rec)
  if r.state == 'committed' then return {'err', 'committed'} end
  if r.state == 'expired' then return {'ok', r.path, r.t, r.n, 1} end
  if r.state == 'held' then
    drop_hold(r.path, r.t, r.n)
    r.state = 'released'
    save_res(rid, r)
    redis.call('ZREM', K_LEASES, rid)
    event('release', r.path, r.t, r.n, rid, {'tags', r.tags, 'reason', A[2]})
  end
  return {'ok', r.path, r.t, r.n, 0}
end
