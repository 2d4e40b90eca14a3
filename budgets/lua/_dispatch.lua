-- Runs a batch of operations of one task, in order.
-- ARGV[3] how many operations; then for each:
--   name, number of accounts, account paths..., number of arguments, arguments...
-- returns one reply per operation, in order.
-- errors (budgets/replies.py DispatchError):
--   'bad_op' -> LedgerError        no operation of that name
-- Leases that ran out are released once, before the batch, by the same clock.
SWEPT = sweep(256)
local out, i = {}, 4
for n = 1, tonumber(ARGV[3]) do
  local op = OPS[ARGV[i]]
  local np = tonumber(ARGV[i + 1])
  i = i + 2
  local K = {}
  for j = 1, np do
    K[j] = ACCT_PREFIX .. ARGV[i]
    i = i + 1
  end
  local na = tonumber(ARGV[i])
  i = i + 1
  local A = {}
  for j = 1, na do
    A[j] = ARGV[i]
    i = i + 1
  end
  if op then out[n] = op(A, K) else out[n] = {'err', 'bad_op'} end
end
return out
