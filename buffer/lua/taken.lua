#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- The lane's owner read its next entries with plain XRANGEs (no consumer group: each sub-lane
-- and the base stream hold only unsettled entries, so what an owner has taken is the head of
-- each up to its cursor). Record it, per stream read: for the base stream raise the cursor 'c'
-- (the newest entry id taken), 'd' (the highest queue number taken: those orders read as
-- "processing", with no per-order write) and 'dl' (its lane number); for a storefront's
-- sub-lane raise 'c:<sf>' and 't:<sf>' (the number in the sub-lane of its newest taken), and
-- 'd' too. A successor takes over everything up to the cursors (claim.lua). Refused (FENCED)
-- unless the caller holds the lane's current epoch.
-- KEYS[1] the lane hash. ARGV[1] epoch, ARGV[2] the drain's changes channel, then 4 per stream
-- read: its storefront ('' the base stream), the newest entry id taken, its queue number and
-- its lane number ('' when it has none: a malformed entry).
local refused = fenced(KEYS[1], ARGV[1])
if refused then
  return refused
end
local function newer(a, b)  -- entry ids compare as (ms, seq)
  if not b then
    return true
  end
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  return ams > bms or (ams == bms and tonumber(aseq) > tonumber(bseq))
end
local d = tonumber(redis.call('HGET', KEYS[1], 'd') or '0')
local changed = false
for i = 3, #ARGV, 4 do
  local sf, newest, seq, ls = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  local c_field = sf == '' and 'c' or ('c:' .. sf)
  if newer(newest, redis.call('HGET', KEYS[1], c_field)) then
    redis.call('HSET', KEYS[1], c_field, newest)
  end
  if seq and seq > d then
    d = seq
    redis.call('HSET', KEYS[1], 'd', seq)
    changed = true
  end
  if sf == '' then
    if seq and ls ~= '' then
      redis.call('HSET', KEYS[1], 'dl', ls)
    end
  elseif tonumber(ls) and tonumber(ls) > tonumber(redis.call('HGET', KEYS[1], 't:' .. sf) or '0') then
    redis.call('HSET', KEYS[1], 't:' .. sf, ls)
    changed = true
  end
end
if changed then
  redis.call('PUBLISH', ARGV[2], 'take')
end
return 1
