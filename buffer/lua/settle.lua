#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- Settle a batch after its Postgres transaction: statuses and timelines, ack and delete the
-- committed and rejected entries, move dead letters to their shard's dead-letter stream, then
-- advance the watermark and publish the drain's state -- all at once, so customers see a batch
-- settle atomically and positions never move backwards. A crash before this runs means
-- redelivery, which the Postgres unique keys turn into a no-op.
-- KEYS[1] drain hash, KEYS[2] admission counter, KEYS[3..2+S] streams of shards 0..S-1,
-- KEYS[3+S..2+2S] their dead-letter streams, KEYS[3+2S] the notification stream, then per
-- item: status key, idem key (KEYS[1] when the entry names no order of its shard).
-- ARGV[1] group, ARGV[2] the status records' ttl s, ARGV[3] S, ARGV[4] now_us, ARGV[5] rate
-- ('' = unchanged), ARGV[6] leader, ARGV[7] webhook key prefix, ARGV[8] the idempotency
-- records' ttl s, ARGV[9] the dead letters' retention s (0 = kept), then 9 per item: shard,
-- entry id, outcome (committed | rejected | dead_lettered), at_us, reason, deliveries, order id,
-- storefront id, storefront order id ('' when unknown).
-- A settled order whose storefront has a webhook also gets an event in the notification stream,
-- in the same atomic step: a notification can be late, never lost, and never delays a commit.
-- Returns the new watermark.
local group, ttl, shards, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local streams = {}
for i = 1, shards do
  streams[i] = KEYS[2 + i]
end
local notify = KEYS[3 + 2 * shards]
local hooked = {}
local function notify_of(sf, sfo, oid, outcome, at)
  if sf == '' or oid == '' then
    return
  end
  if hooked[sf] == nil then
    hooked[sf] = redis.call('EXISTS', ARGV[7] .. sf) == 1
  end
  if hooked[sf] then
    redis.call('XADD', notify, '*', 'type', 'order.' .. outcome, 'oid', oid, 'sf', sf,
      'sfo', sfo, 'status', outcome, 'at', at)
  end
end
local done = {}
local idem_ttl, retention = tonumber(ARGV[8]), tonumber(ARGV[9])
local n = (#ARGV - 9) / 9
for i = 0, n - 1 do
  local a = 10 + i * 9
  local shard, eid, outcome, at, reason = tonumber(ARGV[a]), ARGV[a + 1], ARGV[a + 2],
    ARGV[a + 3], ARGV[a + 4]
  local stream = streams[shard + 1]
  local status_key, idem_key = KEYS[4 + 2 * shards + i * 2], KEYS[5 + 2 * shards + i * 2]
  notify_of(ARGV[a + 7], ARGV[a + 8], ARGV[a + 6], outcome, at)
  local has_status = status_key ~= KEYS[1] and redis.call('EXISTS', status_key) == 1
  if outcome == 'dead_lettered' then
    local entry = redis.call('XRANGE', stream, eid, eid)
    local dl = {'source_id', eid, 'deliveries', ARGV[a + 5], 'error', reason, 'failed_at', at}
    if entry[1] then
      for _, v in ipairs(entry[1][2]) do
        dl[#dl + 1] = v
      end
    end
    local dlq = KEYS[2 + shards + shard + 1]
    redis.call('XADD', dlq, '*', unpack(dl))
    if retention > 0 then  -- ids are milliseconds: what is older than the retention goes
      local t = redis.call('TIME')
      local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      local cutoff = math.max(0, now_ms - retention * 1000)
      redis.call('XTRIM', dlq, 'MINID', string.format('%d', cutoff))
    end
    redis.call('XACK', stream, group, eid)
    redis.call('XDEL', stream, eid)
    if has_status then
      redis.call('HSET', status_key, 'status', 'dead_lettered', 'reason', reason,
        'rejected_at', at)
      mark(status_key, 'dead_lettered', at)
    end
  else
    done[shard] = done[shard] or {}
    table.insert(done[shard], eid)
    if has_status then
      if outcome == 'committed' then
        redis.call('HSET', status_key, 'status', 'committed', 'committed_at', at)
      else
        redis.call('HSET', status_key, 'status', outcome, 'rejected_at', at, 'reason', reason)
      end
      mark(status_key, outcome, at)
      redis.call('EXPIRE', status_key, ttl)
    end
    if idem_key ~= KEYS[1] then
      redis.call('EXPIRE', idem_key, idem_ttl)
    end
  end
end
for shard, ids in pairs(done) do
  redis.call('XACK', streams[shard + 1], group, unpack(ids))
  redis.call('XDEL', streams[shard + 1], unpack(ids))
end
local w = advance_watermark(KEYS[1], KEYS[2], streams, now)
redis.call('HSET', KEYS[1], 'state', 'draining', 'reason', '', 'at', now, 'leader', ARGV[6])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'rate', ARGV[5])
end
redis.call('PUBLISH', KEYS[1] .. ':changed', w)
return w
