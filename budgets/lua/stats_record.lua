-- stats_record: count one call's outcome in every cell it belongs to, once.
-- KEYS[1] cells hash  KEYS[2] the outcome's seen marker
-- ARGV[1] marker ttl (s)  ARGV[2..] field, increment, field, increment, ...
-- returns 1 when counted, 0 when this outcome was already counted
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) == false then return 0 end
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
