#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- Take over what earlier owners of ONE lane took and did not settle: every entry of the stream
-- up to the lane's cursor 'c' (taken.lua). Only the lane's owner calls this, right after taking
-- the lane: its Postgres lock proves the previous owners can no longer commit, and the epoch
-- check below that they can no longer settle.
-- Each such entry counts one more delivery in the lane's deliveries hash (entry id -> times an
-- owner took it and was lost), unless the previous owner is this same worker (it lost its
-- Postgres connection, it did not die on them). That hash is written only here, on takeover.
-- KEYS[1] the lane hash, KEYS[2] the lane's stream, KEYS[3] the lane's deliveries hash.
-- ARGV[1] consumer, ARGV[2] max entries, ARGV[3] epoch.
-- Returns {entries, prior delivery counts aligned with them}.
local refused = fenced(KEYS[1], ARGV[3])
if refused then
  return refused
end
local lane = redis.call('HMGET', KEYS[1], 'c', 'prev')
local cursor, prev = lane[1], lane[2]
if not cursor then
  return {{}, {}}
end
local entries = redis.call('XRANGE', KEYS[2], '-', cursor, 'COUNT', ARGV[2])
local lost = prev and prev ~= '' and prev ~= ARGV[1]
local counts = {}
for i, e in ipairs(entries) do
  if lost then
    counts[i] = redis.call('HINCRBY', KEYS[3], e[1], 1)
  else
    counts[i] = tonumber(redis.call('HGET', KEYS[3], e[1]) or '0')
  end
end
return {entries, counts}
