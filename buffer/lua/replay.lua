#!lua
-- Re-queue dead letters of ONE shard and ONE storefront: back into its sub-lane with their
-- original fields and a new queue number (at the back of the line, like any new order).
-- KEYS[1] the sub-lane (the base stream for entries that name no storefront), KEYS[2]
-- dead-letter stream, KEYS[3] admission counter, KEYS[4] the lane hash, KEYS[5] the
-- storefronts' buffered counts, then per entry i: its status key and idem key (KEYS[1] when
-- the entry names no order).
-- A replayed entry is a new admission of its lane: a new queue number and a new number in its
-- sub-lane.
-- ARGV[1] now_us, ARGV[2] the storefront ('' none), then the dead-letter entry ids. Returns the
-- number re-queued.
local moved = 0
local sub = ARGV[2]
for i = 3, #ARGV do
  local entry = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])
  if entry[1] then
    local seq = redis.call('INCR', KEYS[3])
    local ls = redis.call('HINCRBY', KEYS[4], 'n', 1)
    if sub ~= '' then
      ls = redis.call('HINCRBY', KEYS[4], 'n:' .. sub, 1)
    end
    local f, orig = entry[1][2], {}
    for j = 1, #f, 2 do
      local k = f[j]
      if k ~= 'source_id' and k ~= 'deliveries' and k ~= 'error' and k ~= 'failed_at'
          and k ~= 'seq' and k ~= 'ls' and k ~= 'rq' then
        orig[#orig + 1] = k
        orig[#orig + 1] = f[j + 1]
      end
    end
    orig[#orig + 1] = 'seq'
    orig[#orig + 1] = seq
    orig[#orig + 1] = 'ls'
    orig[#orig + 1] = ls
    orig[#orig + 1] = 'rq'  -- its status record keeps the history once it commits
    orig[#orig + 1] = '1'
    local eid
    if sub ~= '' then
      eid = redis.call('XADD', KEYS[1], '*', unpack(orig))
    else
      eid = redis.call('XADD', KEYS[1], 'NOMKSTREAM', '*', unpack(orig))
    end
    if not eid then
      return redis.error_reply('NOSTREAM buffer stream ' .. KEYS[1] .. ' is missing')
    end
    redis.call('HSET', KEYS[4], 'last', seq)
    local sf = field(f, 'sf')
    if sf and sf ~= '' then
      redis.call('HINCRBY', KEYS[5], sf, 1)
    end
    redis.call('XDEL', KEYS[2], ARGV[i])
    local status_key, idem_key = KEYS[2 * i], KEYS[2 * i + 1]
    if status_key ~= KEYS[1] then
      redis.call('HSET', status_key, 'status', 'queued', 'eid', eid, 'seq', seq, 'ls', ls)
      redis.call('HDEL', status_key, 'reason', 'rejected_at')
      redis.call('PERSIST', status_key)
      mark(status_key, 'requeued', ARGV[1])
    end
    if idem_key ~= KEYS[1] then  -- a replayed receipt names its new place in the line
      local raw = redis.call('GET', idem_key)
      if raw then
        local fp, tail, at, ahead = struct.unpack(IDEM, raw)
        local fresh = idem_pack(fp, tail, at, ahead, ls) .. string.sub(raw, IDEM_LEN + 1)
        redis.call('SET', idem_key, idem_with(fresh, 'q', seq), 'KEEPTTL')
      end
    end
    moved = moved + 1
  end
end
return moved
