#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- Take the next batch of ONE lane (a shard's stream, in admission order) onto its owner's
-- pending list, and mark the orders "processing". Refused (FENCED) unless the caller holds the
-- lane's current epoch.
-- KEYS[1] the lane hash, KEYS[2] the lane's stream.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] n, ARGV[4] epoch, ARGV[5] key prefix,
-- ARGV[6] shard, ARGV[7] now_us.
-- Returns {the entries taken, the id to wait after when there were none}.
local refused = fenced(KEYS[1], ARGV[4])
if refused then
  return refused
end
local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
  'STREAMS', KEYS[2], '>')
if not got or not got[1] or #got[1][2] == 0 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    if field(g, 'name') == ARGV[1] then
      return {{}, field(g, 'last-delivered-id')}
    end
  end
  return {{}, '0-0'}
end
local entries = got[1][2]
local shard = tonumber(ARGV[6])
local top = nil
for _, e in ipairs(entries) do
  mark_processing(ARGV[5], shard, e[2], ARGV[7])
  local s = tonumber(field(e[2], 'seq'))
  if s and (not top or s > top) then
    top = s
  end
end
if top and top > tonumber(redis.call('HGET', KEYS[1], 'd') or '0') then
  redis.call('HSET', KEYS[1], 'd', top)
  redis.call('PUBLISH', ARGV[5] .. ':drain:changed', 'take')
end
return {entries, entries[#entries][1]}
