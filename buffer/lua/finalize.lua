#!lua
-- Finish a committed batch of ONE shard: status, expiry, ack and delete, atomically.
-- Runs only after the Postgres transaction committed, so a crash before it means redelivery,
-- which the Postgres unique keys turn into a no-op.
-- KEYS[1] stream, then per order i: status key, idem key.
-- ARGV[1] group, ARGV[2] ttl seconds for status and idem records, then 4 args per order:
--   entry_id, outcome (committed|rejected), at_us, reason ('' if none).
local group, ttl = ARGV[1], tonumber(ARGV[2])
local n = (#ARGV - 2) / 4
local ids = {}
for i = 0, n - 1 do
  local a = 3 + i * 4
  local status_key, idem_key = KEYS[2 + i * 2], KEYS[3 + i * 2]
  ids[#ids + 1] = ARGV[a]
  if ARGV[a + 1] == 'committed' then
    redis.call('HSET', status_key, 'status', 'committed', 'committed_at', ARGV[a + 2])
  else
    redis.call('HSET', status_key, 'status', ARGV[a + 1], 'rejected_at', ARGV[a + 2],
      'reason', ARGV[a + 3])
  end
  redis.call('EXPIRE', status_key, ttl)
  redis.call('EXPIRE', idem_key, ttl)
end
if #ids > 0 then
  redis.call('XACK', KEYS[1], group, unpack(ids))
  redis.call('XDEL', KEYS[1], unpack(ids))
end
return n
