-- stats_verdict: count whether an outcome was right; a changed verdict moves the count.
-- KEYS[1] cells hash  KEYS[2] the outcome's seen marker (its cell prefixes, '\n'-joined)
-- KEYS[3] the outcome's verdict marker  KEYS[4] the outcome's features marker
-- KEYS[5] the learner's hash (weights w|…, squared gradients g|…, counts n|…)
-- ARGV[1] marker ttl (s)  ARGV[2] 'ok' or 'bad'  ARGV[3] learning rate  ARGV[4] L2 pull
-- returns 1 when counted or moved, 0 when the same verdict was already counted,
--   -1 when the outcome was never recorded (or its marker expired; nothing was changed),
--   -2 when ARGV[3] or ARGV[4] is not a finite number >= 0 (nothing was changed)
-- The cells are the ones stored when the outcome was recorded, never the caller's: a verdict
-- can only move counts between ok and bad of cells that counted this outcome. When counts
-- move, the learner takes one AdaGrad step per head on the features stored with the outcome
-- (lines '<endpoint>|<head>\t<feature>=<value>\t…'), the same step as budgets.learner.learn.
local cells = redis.call('GET', KEYS[2])
if not cells or not string.find(cells, '|', 1, true) then return -1 end
local function finite(x)
  return x ~= nil and x == x and x >= 0 and x < math.huge
end
local rate, pull = tonumber(ARGV[3]), tonumber(ARGV[4])
if not finite(rate) or not finite(pull) then return -2 end
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
local feats = redis.call('GET', KEYS[4])
if feats then
  local y = (new == 'ok') and 1 or 0
  for line in string.gmatch(feats, '[^\n]+') do
    local model, rest = string.match(line, '^([^\t]+)\t?(.*)$')
    local names, xs, ws = {}, {}, {}
    local z = 0
    for name, value in string.gmatch(rest, '([^\t=]+)=([^\t]+)') do
      local w = tonumber(redis.call('HGET', KEYS[5], 'w|' .. model .. '|' .. name) or '0')
      local x = tonumber(value)
      names[#names + 1], xs[#xs + 1], ws[#ws + 1] = name, x, w
      z = z + w * x
    end
    local p
    if z >= 0 then p = 1 / (1 + math.exp(-z)) else p = math.exp(z) / (1 + math.exp(z)) end
    local err = y - p
    for i = 1, #names do
      local grad = err * xs[i] - pull * ws[i]
      local gfield = 'g|' .. model .. '|' .. names[i]
      local g2 = tonumber(redis.call('HGET', KEYS[5], gfield) or '0') + grad * grad
      redis.call('HSET', KEYS[5], gfield, string.format('%.17g', g2))
      if g2 > 0 then
        local w = ws[i] + rate * grad / math.sqrt(g2)
        redis.call('HSET', KEYS[5], 'w|' .. model .. '|' .. names[i], string.format('%.17g', w))
      end
    end
    redis.call('HINCRBY', KEYS[5], 'n|' .. model, 1)
  end
end
return 1
