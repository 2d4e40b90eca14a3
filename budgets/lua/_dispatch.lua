-- Runs a batch of operations of one task, in order.
-- ARGV[3] how many operations; then one argument per operation, its fields
--   joined by the unit separator (\31, budgets/_runner.py SEP):
--   name, number of accounts, account paths..., arguments...
-- returns one reply per operation, in order.
-- errors (budgets/replies.py DispatchError):
--   'bad_op' -> LedgerError        no operation of that name
-- Leases that ran out are released once, before the batch, by the same clock.
-- run(keys, argv) is the whole call; budgets/scripts.py ends the text with
-- "return run(KEYS, ARGV)" for EVALSHA, or registers run as a Redis Function.

-- An operation's fields, in order (the separator closes each, so the last and
-- empty ones come out too).
local function fields(s)
  local out, n = {}, 0
  for x in string.gmatch(s .. '\31', '([^\31]*)\31') do
    n = n + 1
    out[n] = x
  end
  return out
end

-- K of an operation naming no account (most of the hot ones); never written.
local NO_KEYS = {}

-- The operations that work on the batch's copies of accounts; any other one
-- finds Redis up to date (flush_cache) and reads and writes it directly.
local HOT = {reserve = true, commit = true, release = true, withdraw = true, reap = true}

local function run(keys, argv)
  begin(keys, argv)
  SWEPT = sweep(256)
  local out = {}
  for n = 1, tonumber(argv[3]) do
    local f = fields(argv[3 + n])
    local op = OPS[f[1]]
    local np = tonumber(f[2])
    local K = NO_KEYS
    if np > 0 then
      K = {}
      for j = 1, np do K[j] = ACCT_PREFIX .. f[2 + j] end
    end
    local A = {unpack(f, 3 + np)}
    if op then
      if not HOT[f[1]] then flush_cache() end
      local ok, reply = pcall(op, A, K)
      if not ok then
        -- A script error stops the batch; what the operations before it wrote stays,
        -- and so do their events.
        flush_cache()
        flush_events()
        error(reply)
      end
      out[n] = reply
    else
      out[n] = {'err', 'bad_op'}
    end
  end
  flush_cache()
  flush_events()
  return out
end
