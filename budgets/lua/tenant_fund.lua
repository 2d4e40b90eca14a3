-- tenant_fund: hand a task its root budget out of the tenant's current period.
-- KEYS[1] tenant config hash  KEYS[2] tenant ops hash  KEYS[3] tenant events stream
-- ARGV[1] prefix of period hashes  ARGV[2] op id  ARGV[3] task id
-- ARGV[4] tokens (-1 unlimited)  ARGV[5] nanos (-1 unlimited)
-- returns {'ok', period_id, available_tokens, available_nanos} (before funding; -1 = unlimited)
--      or {'err', 'no_tenant'} | {'err', 'unlimited', unit}
--      | {'err', 'insufficient', unit, requested, available} | {'err', 'conflict', op}
local fp = ARGV[3] .. '|' .. ARGV[4] .. '|' .. ARGV[5]
local c = redis.call('HGET', KEYS[2], 'f:' .. ARGV[2])
if c then
  local r = cmsgpack.unpack(c)
  if r[1] ~= fp then return {'err', 'conflict', ARGV[2]} end
  return r[2]
end
local cfg = redis.call('HMGET', KEYS[1], 'lt', 'ln', 'period')
if not cfg[1] then return {'err', 'no_tenant'} end
local t = redis.call('TIME')
local secs = tonumber(t[1])
-- Civil date of the Redis clock (days since 1970-01-01 -> y-m-d), so every
-- worker agrees which period a task is funded from.
local z = math.floor(secs / 86400) + 719468
local era = math.floor(z / 146097)
local doe = z - era * 146097
local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
local mp = math.floor((5 * doy + 2) / 153)
local d = doy - math.floor((153 * mp + 2) / 5) + 1
local m = mp < 10 and mp + 3 or mp - 9
local y = yoe + era * 400 + (m <= 2 and 1 or 0)
local pid = 'all'
if cfg[3] == 'day' then pid = string.format('%04d-%02d-%02d', y, m, d)
elseif cfg[3] == 'month' then pid = string.format('%04d-%02d', y, m) end
local pkey = ARGV[1] .. pid
local limit = {t = tonumber(cfg[1]), n = tonumber(cfg[2])}
local want = {t = tonumber(ARGV[4]), n = tonumber(ARGV[5])}
local used = redis.call('HMGET', pkey, 'ft', 'fn', 'st', 'sn')
local room = {}
room.t = limit.t - tonumber(used[1] or '0') - tonumber(used[3] or '0')
room.n = limit.n - tonumber(used[2] or '0') - tonumber(used[4] or '0')
local avail = {t = -1, n = -1}
for _, u in ipairs({'t', 'n'}) do
  local name = u == 't' and 'tokens' or 'nanos'
  if limit[u] >= 0 then
    if want[u] < 0 then return {'err', 'unlimited', name} end
    avail[u] = math.max(0, room[u])
    if want[u] > room[u] then return {'err', 'insufficient', name, want[u], avail[u]} end
  end
end
redis.call('HINCRBY', pkey, 'ft', math.max(0, want.t))
redis.call('HINCRBY', pkey, 'fn', math.max(0, want.n))
redis.call('HINCRBY', pkey, 'tasks', 1)
redis.call('XADD', KEYS[3], '*', 'op', 'fund', 'task', ARGV[3], 'period', pid,
  't', ARGV[4], 'n', ARGV[5], 'id', ARGV[2])
local reply = {'ok', pid, avail.t, avail.n}
redis.call('HSET', KEYS[2], 'f:' .. ARGV[2], cmsgpack.pack({fp, reply}))
return reply
