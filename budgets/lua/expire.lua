-- expire: give every key of the task's ledger a time to live, in one step: its keys in
-- KEYS (meta, reservations, leases, ops, events, accounts, results) and every account hash.
-- A[1] seconds (a positive integer)
-- returns {'ok', how many keys it was set on}
OPS['expire'] = function(A, K)
  local ttl = A[1]
  local n = 0
  for _, key in ipairs({K_META, K_RES, K_LEASES, K_OPS, K_EVENTS, K_ACCTS, K_RESULTS}) do
    n = n + redis.call('EXPIRE', key, ttl)
  end
  for _, path in ipairs(redis.call('SMEMBERS', K_ACCTS)) do
    n = n + redis.call('EXPIRE', ACCT_PREFIX .. path, ttl)
  end
  return {'ok', n}
end
