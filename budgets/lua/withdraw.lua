-- withdraw: end a reservation's wait without a hold (the caller's deadline
-- passed, or the caller was cancelled). A reservation granted before the
-- withdraw arrived keeps its hold: the caller uses it or releases it.
-- A[1] reservation id  A[2] reason (free text for the audit trail)
-- returns {'ok', 'withdrawn'} (it was waiting: it left the queue and its record
--   is gone), {'ok', 'held', deadline_ms} (it was granted; any later state also
--   answers 'held'), or {'ok', 'gone'} (no record: the wait had ended already)
-- errors: none (its table in budgets/replies.py is empty)
OPS['withdraw'] = function(A, K)
  local rid = A[1]
  local rec = redis.call('HGET', K_RES, rid)
  if not rec then return {'ok', 'gone'} end
  local r = unpack_res(rec)
  if r.state ~= 'waiting' then return {'ok', 'held', tonumber(r.ds)} end
  withdraw_res(rid, r, A[2])
  return {'ok', 'withdrawn'}
end
