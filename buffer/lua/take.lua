#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- Take the next batch of ONE lane (a shard's stream, in admission order) onto its owner's
-- pending list, and raise the lane's 'd': its orders read as "processing" from then on (no
-- per-order write; settle.lua writes the time into each timeline). Refused (FENCED) unless
-- the caller holds the lane's current epoch.
-- KEYS[1] the lane hash, KEYS[2] the lane's stream.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] n, ARGV[4] epoch, ARGV[5] key prefix.
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
local top = nil
for i = #entries, 1, -1 do  -- the newest entry with a queue number (a malformed one may lack it)
  top = tonumber(field(entries[i][2], 'seq'))
  if top then
    break
  end
end
if top and top > tonumber(redis.call('HGET', KEYS[1], 'd') or '0') then
  redis.call('HSET', KEYS[1], 'd', top)
  redis.call('PUBLISH', ARGV[5] .. ':drain:changed', 'take')
end
return {entries, entries[#entries][1]}
