-- stats_verdict: count whether an outcome was right; a changed verdict moves the count.
-- KEYS[1] cells hash  KEYS[2] the outcome's verdict marker
-- ARGV[1] marker ttl (s)  ARGV[2] 'ok' or 'bad'  ARGV[3..] cell prefixes
-- returns 1 when counted or moved, 0 when the same verdict was already counted
local old = redis.call('GET', KEYS[2])
local new = ARGV[2]
if old == new then return 0 end
for i = 3, #ARGV do
  if old then redis.call('HINCRBY', KEYS[1], ARGV[i] .. old, -1) end
  redis.call('HINCRBY', KEYS[1], ARGV[i] .. new, 1)
end
redis.call('SET', KEYS[2], new, 'EX', ARGV[1])
return 1
