#!lua
-- Re-queue dead letters of ONE shard: back into the stream with their original fields.
-- KEYS[1] stream, KEYS[2] dead-letter stream, then per entry i: its status key (or KEYS[1]).
-- ARGV: dead-letter entry ids. Returns the number re-queued.
local moved = 0
for i = 1, #ARGV do
  local entry = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])
  if entry[1] then
    local f, orig = entry[1][2], {}
    for j = 1, #f, 2 do
      local k = f[j]
      if k ~= 'source_id' and k ~= 'deliveries' and k ~= 'error' and k ~= 'failed_at' then
        orig[#orig + 1] = k
        orig[#orig + 1] = f[j + 1]
      end
    end
    if #orig == 0 then
      orig = {'v', 'replayed-empty'}
    end
    local eid = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(orig))
    if not eid then
      return redis.error_reply('NOSTREAM buffer stream ' .. KEYS[1] .. ' is missing')
    end
    redis.call('XDEL', KEYS[2], ARGV[i])
    local status_key = KEYS[2 + i]
    if status_key ~= KEYS[1] then
      redis.call('HSET', status_key, 'status', 'queued', 'eid', eid)
      redis.call('HDEL', status_key, 'reason', 'rejected_at')
      redis.call('PERSIST', status_key)
    end
    moved = moved + 1
  end
end
return moved
