-- tenant_fund: hand one task incarnation its root budget out of the tenant's
-- current period (the funding saga's middle step; see claim.lua, open_task.lua).
-- KEYS[1] tenant config hash  KEYS[2] the incarnation's funding hash
-- KEYS[3] tenant events stream
-- ARGV[1] prefix of period hashes  ARGV[2] task id  ARGV[3] incarnation
-- ARGV[4] tokens (-1 unlimited)  ARGV[5] nanos (-1 unlimited)
-- ARGV[6] most events kept in the stream (XADD MAXLEN ~)
-- ARGV[7] the tenant as an account, for refusals ('tenant:<name>')
-- The funding hash is the incarnation's whole record on the tenant's side:
-- state ('funded' -> 'settled' | 'undone'), period, lt/ln asked, ft/fn counted
-- (0 where unlimited), st/sn spend reported so far, avail_t/avail_n (the reply).
-- A repeat for the same incarnation returns the first reply and writes nothing.
-- returns {'ok', period_id, available_tokens, available_nanos} (before funding; -1 = unlimited)
-- errors (budgets/replies.py FundError):
--   'no_tenant' -> UnknownTenant          no configuration for this tenant
--   'unlimited' -> UnlimitedChild         {.., tenant, unit}: unlimited under a limit
--   'insufficient' -> BudgetExceeded      {.., tenant, unit, requested, available}
--   'conflict' -> OperationConflict       this incarnation was funded with other amounts
--   'undone' -> OpenAborted               this incarnation's funding was given back
local f = redis.call('HMGET', KEYS[2], 'state', 'lt', 'ln', 'period', 'avail_t', 'avail_n')
if f[1] then
  if f[2] ~= ARGV[4] or f[3] ~= ARGV[5] then return {'err', 'conflict'} end
  if f[1] == 'undone' then return {'err', 'undone'} end
  return {'ok', f[4], tonumber(f[5]), tonumber(f[6])}
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
    if want[u] < 0 then return {'err', 'unlimited', ARGV[7], name} end
    avail[u] = math.max(0, room[u])
    if want[u] > room[u] then return {'err', 'insufficient', ARGV[7], name, want[u], avail[u]} end
  end
end
local fund = {t = math.max(0, want.t), n = math.max(0, want.n)}
redis.call('HINCRBY', pkey, 'ft', fund.t)
redis.call('HINCRBY', pkey, 'fn', fund.n)
redis.call('HINCRBY', pkey, 'tasks', 1)
redis.call('HSET', KEYS[2], 'state', 'funded', 'task', ARGV[2], 'inc', ARGV[3], 'period', pid,
  'lt', ARGV[4], 'ln', ARGV[5], 'ft', fund.t, 'fn', fund.n, 'st', 0, 'sn', 0,
  'avail_t', avail.t, 'avail_n', avail.n, 'funded_s', secs)
redis.call('HSET', KEYS[1], 'last', pid)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'op', 'fund', 'task', ARGV[2],
  'inc', ARGV[3], 'period', pid, 't', ARGV[4], 'n', ARGV[5])
return {'ok', pid, avail.t, avail.n}
