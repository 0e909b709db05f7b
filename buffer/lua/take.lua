#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- Take the next batch of the one queue: the entries with the next queue numbers, across all
-- shards, onto this consumer's pending lists, and mark their orders "processing".
-- The drain cursor d says every queue number <= d has been delivered; the batch is every entry
-- with a queue number in (d, min(d + n, counter)], so batches follow admission order exactly.
-- KEYS[1] drain hash, KEYS[2] admission counter, KEYS[3..] the streams of shards 0, 1, ...
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] n, ARGV[4] key prefix, ARGV[5] now_us.
-- Returns {new cursor, {last delivered id per shard}, {entries per shard}}.
local group, consumer, n, prefix, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local shards = #KEYS - 2
local d = math.max(tonumber(redis.call('HGET', KEYS[1], 'd') or '0'),
  tonumber(redis.call('HGET', KEYS[1], 'w') or '0'))
local limit = math.min(d + n, tonumber(redis.call('GET', KEYS[2]) or '0'))
local chunk = math.min(n, math.ceil(2 * n / shards) + 16)
local last_ids, taken = {}, {}
for i = 1, shards do
  local stream, shard = KEYS[2 + i], i - 1
  local delivered = nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    if field(g, 'name') == group then
      delivered = field(g, 'last-delivered-id')
    end
  end
  if not delivered then
    return redis.error_reply('NOGROUP no consumer group on ' .. stream)
  end
  -- Count the undelivered entries up to the limit (an entry without a queue number is
  -- malformed: it is taken where it stands, and dead-lettered by the worker).
  local count, from, done = 0, '(' .. delivered, (limit <= d)
  while not done do
    local got = redis.call('XRANGE', stream, from, '+', 'COUNT', chunk)
    for _, e in ipairs(got) do
      local s = tonumber(field(e[2], 'seq'))
      if s and s > limit then
        done = true
        break
      end
      count = count + 1
    end
    if not done then
      if #got < chunk then
        done = true
      else
        from = '(' .. got[#got][1]
      end
    end
  end
  local entries = {}
  if count > 0 then
    entries = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
      'STREAMS', stream, '>')[1][2]
    for _, e in ipairs(entries) do
      mark_processing(prefix, shard, e[2], now)
    end
    delivered = entries[#entries][1]
  end
  last_ids[i] = delivered
  taken[i] = entries
end
if limit > d then
  redis.call('HSET', KEYS[1], 'd', limit)
  redis.call('PUBLISH', KEYS[1] .. ':changed', limit)
else
  limit = d
end
return {limit, last_ids, taken}
