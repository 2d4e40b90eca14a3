-- reap: release reservations of a task whose leases ran out.
-- A[1] most to release in this call
-- returns {'ok', released, remaining_leases}
OPS['reap'] = function(A, K)
  local n = SWEPT + sweep(tonumber(A[1]))
  SWEPT = 0  -- counted once, by the first reap of the batch
  return {'ok', n, redis.call('ZCARD', K_LEASES)}
end
