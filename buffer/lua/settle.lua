#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory.
-- Settle a batch of ONE lane after its Postgres transaction: statuses and timelines, ack and
-- delete the committed and rejected entries, move dead letters to the lane's dead-letter
-- stream, advance the lane's watermark and the settled counts, publish -- all at once, so
-- customers see a batch settle atomically and positions never move backwards. A crash before
-- this runs means redelivery, which the Postgres unique keys turn into a no-op. Refused
-- (FENCED) unless the caller holds the lane's current epoch: a deposed owner's late settle
-- cannot count a batch twice.
-- KEYS[1] lane hash, KEYS[2] drain hash, KEYS[3] stream, KEYS[4] dead-letter stream,
-- KEYS[5] notification stream, KEYS[6] the lane's deliveries hash (claim.lua; it exists only
-- after a takeover), KEYS[7] and KEYS[8] the storefronts' buffered and settled counts
-- (buffer/storefronts.py), then one per plain commit: its idem key; then two per
-- exception: its status key, its idem key (KEYS[1] when the entry names no order of this lane,
-- or, as a status key, when the order gets no record).
-- ARGV[1] unused, ARGV[2] the status records' ttl s, ARGV[3] epoch, ARGV[4] now_us, ARGV[5]
-- rate ('' = unchanged), ARGV[6] owner, ARGV[7] webhook key prefix, ARGV[8] the idempotency
-- records' ttl s, ARGV[9] the dead letters' retention s (0 = kept), ARGV[10] the drain's
-- changes channel, ARGV[11] when the batch was taken (us: its orders' "processing" mark),
-- ARGV[12] p, the number of plain commits, ARGV[13] when they committed (us; one transaction),
-- then one per plain commit: entry id, order id, storefront id, storefront order id joined by
-- \31 (a control byte, which none of them contains; PLAIN splits them),
-- then 13 per exception (rejected, dead-lettered, re-queued, or committed at another instant):
-- entry id, outcome (committed | rejected | dead_lettered), at_us, reason,
-- deliveries, order id, storefront id, storefront order id ('' when unknown), '1' when the order
-- has a status record to update (one re-queued from the dead letters: it holds the history its
-- Postgres row cannot tell), and its accepted_at_us, queue number, lane number and ahead.
-- So a plain commit, the normal case, costs the client two arguments to encode, not 15.
-- Nothing is written per committed order: its Postgres row tells its status and timeline from
-- now on. A rejected or dead-lettered order gets a status record (for status_ttl_s), since it
-- has no row.
-- A settled order whose storefront has a webhook also gets an event in the notification stream,
-- in the same atomic step: a notification can be late, never lost, and never delays a commit.
-- Returns {the lane's watermark, entries settled by this call}.
local refused = fenced(KEYS[1], ARGV[3])
if refused then
  return refused
end
local ttl, now = tonumber(ARGV[2]), ARGV[4]
local lane, stream, dlq, notify = KEYS[1], KEYS[3], KEYS[4], KEYS[5]
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
local done, lettered, settled = {}, {}, 0
local by_sf, sfs = {}, {}  -- orders leaving the buffer, per storefront
local function leaves(sf)
  if sf ~= '' then
    if not by_sf[sf] then
      by_sf[sf] = 0
      sfs[#sfs + 1] = sf
    end
    by_sf[sf] = by_sf[sf] + 1
  end
end
local idem_ttl, retention = tonumber(ARGV[8]), tonumber(ARGV[9])
local taken = ARGV[11]
local p, committed_at = tonumber(ARGV[12]), ARGV[13]
local PLAIN = '^([^\31]*)\31([^\31]*)\31([^\31]*)\31(.*)$'
local n = (#ARGV - 13 - p) / 13
local function record(status_key, a, outcome, at, reason)
  -- the record of an order that leaves without a row (or, re-queued, with its history)
  if ARGV[a + 8] == '1' and redis.call('EXISTS', status_key) == 1 then
    if outcome == 'committed' then
      redis.call('HSET', status_key, 'status', 'committed', 'committed_at', at)
    else
      redis.call('HSET', status_key, 'status', outcome, 'rejected_at', at, 'reason', reason)
    end
    mark2(status_key, taken, outcome, at)
  else
    local accepted = ARGV[a + 9]
    redis.call('HSET', status_key, 'status', outcome, 'sf', ARGV[a + 6], 'sfo', ARGV[a + 7],
      'at', accepted, 'seq', ARGV[a + 10], 'ls', ARGV[a + 11], 'a0', ARGV[a + 12],
      'rejected_at', at, 'reason', reason,
      'tl', 'accepted@' .. accepted .. ',processing@' .. taken .. ',' .. outcome .. '@' .. at)
  end
  redis.call('EXPIRE', status_key, ttl)
end
for i = 1, p do
  local eid, oid, sf, sfo = string.match(ARGV[13 + i], PLAIN)
  notify_of(sf, sfo, oid, 'committed', committed_at)
  done[#done + 1] = eid
  leaves(sf)
  local idem_key = KEYS[8 + i]
  if idem_key ~= lane then
    redis.call('EXPIRE', idem_key, idem_ttl)
  end
end
for i = 0, n - 1 do
  local a = 14 + p + i * 13
  local eid, outcome, at, reason = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local status_key, idem_key = KEYS[9 + p + i * 2], KEYS[10 + p + i * 2]
  local plain = outcome == 'committed' and ARGV[a + 8] ~= '1'
  if outcome == 'dead_lettered' then
    local entry = redis.call('XRANGE', stream, eid, eid)
    if entry[1] then
      notify_of(ARGV[a + 6], ARGV[a + 7], ARGV[a + 5], outcome, at)
      local dl = {'source_id', eid, 'deliveries', ARGV[a + 4], 'error', reason, 'failed_at', at}
      for _, v in ipairs(entry[1][2]) do
        dl[#dl + 1] = v
      end
      redis.call('XADD', dlq, '*', unpack(dl))
      if retention > 0 then  -- ids are milliseconds: what is older than the retention goes
        local t = redis.call('TIME')
        local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        local cutoff = math.max(0, now_ms - retention * 1000)
        redis.call('XTRIM', dlq, 'MINID', string.format('%d', cutoff))
      end
      settled = settled + redis.call('XDEL', stream, eid)
      lettered[#lettered + 1] = eid
      leaves(field(entry[1][2], 'sf') or '')
      if status_key ~= lane then
        record(status_key, a, 'dead_lettered', at, reason)
      end
    end
  else
    notify_of(ARGV[a + 6], ARGV[a + 7], ARGV[a + 5], outcome, at)
    done[#done + 1] = eid
    leaves(ARGV[a + 6])
    if not plain and status_key ~= lane then
      record(status_key, a, outcome, at, reason)
    end
    if idem_key ~= lane then
      redis.call('EXPIRE', idem_key, idem_ttl)
    end
  end
end
if #done > 0 then
  settled = settled + redis.call('XDEL', stream, unpack(done))
end
if redis.call('EXISTS', KEYS[6]) == 1 then  -- after a takeover: forget the settled ones' counts
  if #done > 0 then
    redis.call('HDEL', KEYS[6], unpack(done))
  end
  if #lettered > 0 then
    redis.call('HDEL', KEYS[6], unpack(lettered))
  end
end
-- The lane's watermark: every entry of this lane with a queue number <= it is settled. The
-- lowest queue number left in the stream, minus one, or the lane's last admitted one when the
-- stream is empty; it never goes down.
local low = nil
for _, e in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', 4)) do
  local s = tonumber(field(e[2], 'seq'))
  if s then
    low = s
    break
  end
end
local w = low and (low - 1) or tonumber(redis.call('HGET', lane, 'last') or '0')
local old = tonumber(redis.call('HGET', lane, 'w') or '0')
if w > old then
  redis.call('HSET', lane, 'w', w)
else
  w = old
end
-- Each storefront's share of the buffer shrinks by its orders that left (a field goes at 0, so
-- the hash's length counts the storefronts holding orders). Entries deleted by hand before
-- their settle would be counted here again: the count stops at 0.
for _, sf in ipairs(sfs) do
  local left = redis.call('HINCRBY', KEYS[7], sf, -by_sf[sf])
  if left <= 0 then
    redis.call('HDEL', KEYS[7], sf)
  end
  redis.call('HINCRBY', KEYS[8], sf, by_sf[sf])
end
if settled > 0 then
  redis.call('HINCRBY', lane, 's', settled)
  redis.call('HINCRBY', KEYS[2], 's', settled)
  redis.call('HSET', lane, 'wat', now)
end
redis.call('HSET', lane, 'state', 'draining', 'reason', '', 'at', now, 'owner', ARGV[6])
if ARGV[5] ~= '' then
  redis.call('HSET', lane, 'rate', ARGV[5])
end
redis.call('PUBLISH', ARGV[10], w)
return {w, settled}
