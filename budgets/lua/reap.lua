-- reap: release reservations of a task whose leases ran out.
-- ARGV[2] most to release in this call
-- returns {'ok', released, remaining_leases}
local n = sweep(tonumber(ARGV[2]))
return {'ok', n, redis.call('ZCARD', K_LEASES)}
