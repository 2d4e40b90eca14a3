-- stats_record: count one call's outcome in every cell it belongs to, once.
-- KEYS[1] cells hash  KEYS[2] the outcome's seen marker  KEYS[3] the outcome's verdict marker
-- KEYS[4] the outcome's features marker (what its verdict teaches the learner)
-- ARGV[1] marker ttl (s)  ARGV[2] the outcome's cell prefixes, joined by '\n' (the marker's value)
-- ARGV[3] output tokens used  ARGV[4] the outcome's encoded features ('' for none)
-- ARGV[5] m, the number of peak fields  ARGV[6..5+m] peak fields
-- ARGV[6+m..] field, increment, field, increment, ...
-- returns 1 when counted, 0 when this outcome was already counted,
--   {-1, index} when ARGV[index] is not a non-negative integer (nothing was changed)
-- Every argument is checked before the first write, and the marker is set with the counts, so
-- an outcome is either fully counted and marked or not touched at all.
local function count(i)
  local v = ARGV[i]
  return v ~= nil and #v <= 16 and string.match(v, '^%d+$') ~= nil
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if not count(1) or tonumber(ARGV[1]) < 1 then return {-1, 1} end
if not count(3) then return {-1, 3} end
if not count(5) then return {-1, 5} end
local first = 6 + tonumber(ARGV[5])
if first - 1 > #ARGV or (#ARGV - first + 1) % 2 ~= 0 then return {-1, 5} end
for i = first + 1, #ARGV, 2 do
  if not count(i) then return {-1, i} end
end
local used = tonumber(ARGV[3])
for i = 6, first - 1 do
  local peak = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if used > peak then redis.call('HSET', KEYS[1], ARGV[i], ARGV[3]) end
end
for i = first, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
-- a verdict left from an earlier life of this outcome id judged other counts: start afresh
redis.call('DEL', KEYS[3])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[4], ARGV[4], 'EX', ARGV[1])
else
  redis.call('DEL', KEYS[4])
end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[1])
return 1
