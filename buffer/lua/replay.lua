#!lua
-- Re-queue dead letters of ONE shard: back into the stream with their original fields and a
-- new queue number (at the back of the line, like any new order).
-- KEYS[1] stream, KEYS[2] dead-letter stream, KEYS[3] admission counter, then per entry i: its
-- status key and idem key (KEYS[1] when the entry names no order).
-- ARGV[1] now_us, then the dead-letter entry ids. Returns the number re-queued.
local moved = 0
for i = 2, #ARGV do
  local entry = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])
  if entry[1] then
    local seq = redis.call('INCR', KEYS[3])
    local f, orig, has_seq = entry[1][2], {}, false
    for j = 1, #f, 2 do
      local k = f[j]
      if k ~= 'source_id' and k ~= 'deliveries' and k ~= 'error' and k ~= 'failed_at' then
        orig[#orig + 1] = k
        if k == 'seq' then
          orig[#orig + 1] = seq
          has_seq = true
        else
          orig[#orig + 1] = f[j + 1]
        end
      end
    end
    if not has_seq then
      orig[#orig + 1] = 'seq'
      orig[#orig + 1] = seq
    end
    local eid = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(orig))
    if not eid then
      return redis.error_reply('NOSTREAM buffer stream ' .. KEYS[1] .. ' is missing')
    end
    redis.call('XDEL', KEYS[2], ARGV[i])
    local status_key, idem_key = KEYS[2 * i], KEYS[2 * i + 1]
    if status_key ~= KEYS[1] then
      redis.call('HSET', status_key, 'status', 'queued', 'eid', eid, 'seq', seq)
      redis.call('HDEL', status_key, 'reason', 'rejected_at')
      redis.call('PERSIST', status_key)
      mark(status_key, 'requeued', ARGV[1])
    end
    if idem_key ~= KEYS[1] then
      redis.call('HSET', idem_key, 'seq', seq)
    end
    moved = moved + 1
  end
end
return moved
