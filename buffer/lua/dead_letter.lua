#!lua
-- Move entries of ONE shard to its dead-letter stream, with the error, atomically.
-- KEYS[1] stream, KEYS[2] dead-letter stream, then per entry i: its status key (or KEYS[1]
-- when the entry is too broken to name its order).
-- ARGV[1] group, ARGV[2] now_us, then 3 args per entry: entry_id, deliveries, error.
local group, now_us = ARGV[1], ARGV[2]
local n = (#ARGV - 2) / 3
local moved = 0
for i = 0, n - 1 do
  local a = 3 + i * 3
  local eid, status_key = ARGV[a], KEYS[3 + i]
  local entry = redis.call('XRANGE', KEYS[1], eid, eid)
  local fields = {}
  if entry[1] then
    fields = entry[1][2]
  end
  local dl = {'source_id', eid, 'deliveries', ARGV[a + 1], 'error', ARGV[a + 2],
    'failed_at', now_us}
  for j = 1, #fields do
    dl[#dl + 1] = fields[j]
  end
  redis.call('XADD', KEYS[2], '*', unpack(dl))
  redis.call('XACK', KEYS[1], group, eid)
  redis.call('XDEL', KEYS[1], eid)
  if status_key ~= KEYS[1] then
    redis.call('HSET', status_key, 'status', 'dead_lettered', 'reason', ARGV[a + 2],
      'rejected_at', now_us)
  end
  moved = moved + 1
end
return moved
