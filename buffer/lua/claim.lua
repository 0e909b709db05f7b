#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- Take over every pending entry of every shard. Only the drain's leader calls this, and the
-- leader's Postgres lock proves the previous holders can no longer commit anything.
-- Entries this consumer already owned keep their delivery count (it lost its Postgres
-- connection, it did not die on them); others' entries count one more delivery.
-- KEYS[1] drain hash, KEYS[2] admission counter, KEYS[3..] the streams of shards 0, 1, ...
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] key prefix, ARGV[4] now_us, ARGV[5] max per shard.
-- Returns {{entries per shard}, {prior delivery counts per shard, aligned with the entries}}.
local group, consumer, prefix, now, max = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local all_entries, all_counts = {}, {}
for i = 1, #KEYS - 2 do
  local stream, shard = KEYS[2 + i], i - 1
  local prior, own, others = {}, {}, {}
  for _, p in ipairs(redis.call('XPENDING', stream, group, '-', '+', max)) do
    prior[p[1]] = p[4]
    if p[2] == consumer then
      own[#own + 1] = p[1]
    else
      others[#others + 1] = p[1]
    end
  end
  local entries, counts = {}, {}
  local function take(claimed)
    for _, e in ipairs(claimed) do
      if e and e[2] then
        entries[#entries + 1] = e
        counts[#counts + 1] = prior[e[1]]
        mark_processing(prefix, shard, e[2], now)
      end
    end
  end
  for _, id in ipairs(own) do
    take(redis.call('XCLAIM', stream, group, consumer, 0, id, 'RETRYCOUNT', prior[id]))
  end
  if #others > 0 then
    take(redis.call('XCLAIM', stream, group, consumer, 0, unpack(others)))
  end
  all_entries[i] = entries
  all_counts[i] = counts
end
return {all_entries, all_counts}
