#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- Take over every pending entry of ONE lane. Only the lane's owner calls this, right after
-- taking the lane: its Postgres lock proves the previous owners can no longer commit, and the
-- epoch check below that they can no longer settle.
-- Entries this consumer already owned keep their delivery count (it lost its Postgres
-- connection, it did not die on them); others' entries count one more delivery.
-- KEYS[1] the lane hash, KEYS[2] the lane's stream.
-- ARGV[1] group, ARGV[2] consumer, ARGV[3] max entries, ARGV[4] epoch.
-- Returns {entries, prior delivery counts aligned with them}.
local refused = fenced(KEYS[1], ARGV[4])
if refused then
  return refused
end
local group, consumer, stream = ARGV[1], ARGV[2], KEYS[2]
local prior, own, others = {}, {}, {}
for _, p in ipairs(redis.call('XPENDING', stream, group, '-', '+', ARGV[3])) do
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
    end
  end
end
for _, id in ipairs(own) do
  take(redis.call('XCLAIM', stream, group, consumer, 0, id, 'RETRYCOUNT', prior[id]))
end
if #others > 0 then
  take(redis.call('XCLAIM', stream, group, consumer, 0, unpack(others)))
end
return {entries, counts}
