-- tenant_settle: report one task incarnation's spend to its tenant and, when the
-- task closes (or its open is undone), stop counting its funding.
-- KEYS[1] the incarnation's funding hash (see tenant_fund.lua)
-- KEYS[2] tenant events stream
-- ARGV[1] prefix of period hashes  ARGV[2] 'close' | 'undo' | 'spend'
-- ARGV[3] tokens spent so far  ARGV[4] nanos spent so far (the task root's st + ct)
-- ARGV[5] most events kept in the stream (XADD MAXLEN ~)
-- ARGV[6] retention of an undone funding hash (s)
-- 'close' and 'undo' take the funding out of the period's ft/fn once (state
-- 'funded' -> 'settled' or 'undone'); 'close' and 'spend' count spend in st/sn
-- up to the highest total reported, so a repeat, or totals arriving out of order,
-- never count a unit twice. Everything lands in the funding period.
-- returns {'ok', state, counted_tokens, counted_nanos}: the record's state after the
--   call ('none' if there is no record) and the spend this call newly counted
local f = redis.call('HMGET', KEYS[1], 'state', 'period', 'ft', 'fn', 'st', 'sn', 'task', 'inc')
if not f[1] then return {'ok', 'none', 0, 0} end
local pkey = ARGV[1] .. f[2]
local mode, state = ARGV[2], f[1]
local ended = false
if state == 'funded' and mode ~= 'spend' then
  redis.call('HINCRBY', pkey, 'ft', 0 - tonumber(f[3]))
  redis.call('HINCRBY', pkey, 'fn', 0 - tonumber(f[4]))
  state = mode == 'undo' and 'undone' or 'settled'
  redis.call('HSET', KEYS[1], 'state', state, 'ended_s', redis.call('TIME')[1])
  if state == 'undone' then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
  ended = true
end
local add = {t = 0, n = 0}
if state ~= 'undone' and mode ~= 'undo' then
  add.t = math.max(0, tonumber(ARGV[3]) - tonumber(f[5]))
  add.n = math.max(0, tonumber(ARGV[4]) - tonumber(f[6]))
  if add.t > 0 or add.n > 0 then
    redis.call('HINCRBY', pkey, 'st', add.t)
    redis.call('HINCRBY', pkey, 'sn', add.n)
    redis.call('HINCRBY', KEYS[1], 'st', add.t)
    redis.call('HINCRBY', KEYS[1], 'sn', add.n)
  end
end
if ended or add.t > 0 or add.n > 0 then
  local op = 'spend'
  if ended then op = state == 'undone' and 'undo' or 'settle' end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'op', op, 'task', f[7], 'inc', f[8],
    'period', f[2], 't', add.t, 'n', add.n, 'funded_t', f[3], 'funded_n', f[4])
end
return {'ok', state, add.t, add.n}
