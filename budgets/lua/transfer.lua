-- transfer: move unallocated budget between a parent and a child, or between
-- two siblings through their parent. Never takes more than the source has
-- available (so never below what it has spent, reserved or carved).
-- KEYS[7] source account hash  KEYS[8] destination account hash
-- KEYS[9] the common parent hash (siblings only)
-- ARGV[2] op id  ARGV[3] source path  ARGV[4] destination path
-- ARGV[5] tokens  ARGV[6] nanos  ARGV[7] 'down' | 'up' | 'across'
-- returns {'ok', src_available_tokens, src_available_nanos, dst_available_tokens, dst_available_nanos}
--      or {'err', 'no_account', path} | {'err', 'closed'} | {'err', 'relation'}
--      | {'err', 'unlimited', unit} | {'err', 'insufficient', unit, requested, available}
local spath, dpath, dir = ARGV[3], ARGV[4], ARGV[7]
local amt = {t = tonumber(ARGV[5]), n = tonumber(ARGV[6])}
local fp = spath .. '|' .. dpath .. '|' .. ARGV[5] .. '|' .. ARGV[6]
local prior = recall('t:' .. ARGV[2], fp)
if prior then return prior end
sweep(64)
local s, d = load(KEYS[7]), load(KEYS[8])
if not s then return {'err', 'no_account', spath} end
if not d then return {'err', 'no_account', dpath} end
if s.closed or d.closed then return {'err', 'closed'} end
local mid = nil
if dir == 'down' then
  if d.parent ~= spath then return {'err', 'relation'} end
elseif dir == 'up' then
  if s.parent ~= dpath then return {'err', 'relation'} end
else
  if s.parent ~= d.parent or s.parent == '' then return {'err', 'relation'} end
  mid = load(KEYS[9])
  if not mid or mid.closed then return {'err', 'closed'} end
end
for _, u in ipairs(UNITS) do
  if amt[u] > 0 then
    -- The receiving limit must be a number to grow, and an upward move must
    -- come out of a limit (a child of a limited parent is always limited).
    if not limited(d, u) or not limited(s, u) and dir ~= 'down' then
      return {'err', 'unlimited', UNIT_NAME[u]}
    end
    if limited(s, u) and amt[u] > room(s, u) then
      return {'err', 'insufficient', UNIT_NAME[u], amt[u], math.max(0, room(s, u))}
    end
  end
end
local parent_key = KEYS[7]
if dir == 'up' then parent_key = KEYS[8] elseif dir == 'across' then parent_key = KEYS[9] end
for _, u in ipairs(UNITS) do
  if amt[u] > 0 then
    if dir == 'down' then
      redis.call('HINCRBY', KEYS[7], 'a' .. u, amt[u])
      redis.call('HINCRBY', KEYS[8], 'l' .. u, amt[u])
    else
      -- up or across: the source gives back part of its limit to the parent;
      -- across, the parent carves it straight into the destination.
      redis.call('HINCRBY', KEYS[7], 'l' .. u, 0 - amt[u])
      if dir == 'up' then
        redis.call('HINCRBY', parent_key, 'a' .. u, 0 - amt[u])
      else
        redis.call('HINCRBY', KEYS[8], 'l' .. u, amt[u])
      end
    end
  end
end
event('transfer', spath, ARGV[5], ARGV[6], ARGV[2], {'to', dpath, 'dir', dir})
s, d = load(KEYS[7]), load(KEYS[8])
return remember('t:' .. ARGV[2], fp, {'ok', shown(s, 't'), shown(s, 'n'), shown(d, 't'), shown(d, 'n')})
