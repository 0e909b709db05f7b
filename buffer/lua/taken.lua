#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- The lane's owner read its next entries with a plain XRANGE (no consumer group: the stream
-- holds only unsettled entries, so what an owner has taken is the head of the stream up to its
-- cursor). Record it: raise the cursor 'c' (the newest entry id taken), 'd' (the highest queue
-- number taken: those orders read as "processing", with no per-order write) and 'dl' (its lane
-- number). A successor takes over everything up to 'c' (claim.lua). Refused (FENCED) unless
-- the caller holds the lane's current epoch.
-- KEYS[1] the lane hash. ARGV[1] epoch, ARGV[2] the newest entry id taken, ARGV[3] its queue
-- number and ARGV[4] its lane number ('' when it has none: a malformed entry), ARGV[5] the
-- drain's changes channel.
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
local lane = redis.call('HMGET', KEYS[1], 'c', 'd')
if newer(ARGV[2], lane[1]) then
  redis.call('HSET', KEYS[1], 'c', ARGV[2])
end
local seq = tonumber(ARGV[3])
if seq and seq > tonumber(lane[2] or '0') then
  redis.call('HSET', KEYS[1], 'd', seq, 'dl', ARGV[4])
  redis.call('PUBLISH', ARGV[5], 'take')
end
return 1
