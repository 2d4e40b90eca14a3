-- stats_verdict: count whether an outcome was right; a changed verdict moves the count.
-- KEYS[1] cells hash  KEYS[2] the outcome's seen marker (its cell prefixes, '\n'-joined)
-- KEYS[3] the outcome's verdict marker
-- ARGV[1] marker ttl (s)  ARGV[2] 'ok' or 'bad'
-- returns 1 when counted or moved, 0 when the same verdict was already counted,
--   -1 when the outcome was never recorded (or its marker expired; nothing was changed)
-- The cells are the ones stored when the outcome was recorded, never the caller's: a verdict
-- can only move counts between ok and bad of cells that counted this outcome.
local cells = redis.call('GET', KEYS[2])
if not cells or not string.find(cells, '|', 1, true) then return -1 end
local old = redis.call('GET', KEYS[3])
local new = ARGV[2]
if old == new then return 0 end
for prefix in string.gmatch(cells, '[^\n]+') do
  if old and tonumber(redis.call('HGET', KEYS[1], prefix .. old) or '0') > 0 then
    redis.call('HINCRBY', KEYS[1], prefix .. old, -1)
  end
  redis.call('HINCRBY', KEYS[1], prefix .. new, 1)
end
redis.call('SET', KEYS[3], new, 'EX', ARGV[1])
return 1
