-- unclaim: give a claimed task id back when its tenant refused to fund it.
-- Only the claim of that incarnation, and only while nothing was opened.
-- A[1] incarnation
-- returns {'ok', 1} when the claim was removed, {'ok', 0} when there was none
OPS['unclaim'] = function(A, K)
  local m = redis.call('HMGET', K_META, 'status', 'inc')
  if m[1] ~= 'claimed' or m[2] ~= A[1] then return {'ok', 0} end
  redis.call('DEL', K_META)
  return {'ok', 1}
end
