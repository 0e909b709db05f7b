#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- Make a worker the lane's owner under a new epoch (the caller holds the lane's Postgres lock),
-- keeping the one before as 'prev' (claim.lua counts deliveries lost by another worker only).
-- KEYS[1] the lane hash. ARGV[1] worker. Returns the new epoch.
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local before = redis.call('HGET', KEYS[1], 'owner') or ''
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'prev', before)
return epoch
