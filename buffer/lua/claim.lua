#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- Take over what earlier owners of ONE lane took and did not settle: every entry of the base
-- stream up to the lane's cursor 'c', and of each storefront's sub-lane up to its 'c:<sf>'
-- (taken.lua). Only the lane's owner calls this, right after taking the lane: its Postgres lock
-- proves the previous owners can no longer commit, and the epoch check below that they can no
-- longer settle.
-- Each such entry counts one more delivery in the lane's deliveries hash (entry id -> times an
-- owner took it and was lost), unless the previous owner is this same worker (it lost its
-- Postgres connection, it did not die on them). That hash is written only here, on takeover.
-- KEYS[1] the lane hash, KEYS[2] the lane's base stream, KEYS[3] the lane's deliveries hash,
-- then one per sub-lane with a cursor: its stream.
-- ARGV[1] consumer, ARGV[2] max entries, ARGV[3] epoch, then the sub-lanes' storefronts.
-- Returns {entries per stream (the base stream first), prior delivery counts aligned}.
local refused = fenced(KEYS[1], ARGV[3])
if refused then
  return refused
end
local prev = redis.call('HGET', KEYS[1], 'prev')
local lost = prev and prev ~= '' and prev ~= ARGV[1]
local left = tonumber(ARGV[2])
local all, all_counts = {}, {}
local function claim(stream, cursor)
  local entries, counts = {}, {}
  if cursor and left > 0 then
    entries = redis.call('XRANGE', stream, '-', cursor, 'COUNT', left)
    left = left - #entries
    for i, e in ipairs(entries) do
      if lost then
        counts[i] = redis.call('HINCRBY', KEYS[3], e[1], 1)
      else
        counts[i] = tonumber(redis.call('HGET', KEYS[3], e[1]) or '0')
      end
    end
  end
  all[#all + 1] = entries
  all_counts[#all_counts + 1] = counts
end
claim(KEYS[2], redis.call('HGET', KEYS[1], 'c'))
for i = 4, #KEYS do
  claim(KEYS[i], redis.call('HGET', KEYS[1], 'c:' .. ARGV[i]))
end
return {all, all_counts}
