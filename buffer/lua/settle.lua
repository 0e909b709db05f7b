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
-- (buffer/storefronts.py), then the lane's sub-lanes: those the batch came from and every one
-- the caller knows with orders in it (ARGV[14] of them, their storefronts after it), then one per plain commit: its idem key; then two per
-- exception: its status key, its idem key (KEYS[1] when the entry names no order of this lane,
-- or, as a status key, when the order gets no record).
-- ARGV[1] the lane's 'last' as the caller last read it ('' = the lane's own), ARGV[2] the
-- status records' ttl s, ARGV[3] epoch, ARGV[4] now_us, ARGV[5]
-- rate ('' = unchanged), ARGV[6] owner, ARGV[7] webhook key prefix, ARGV[8] the idempotency
-- records' ttl s, ARGV[9] the dead letters' retention s (0 = kept), ARGV[10] the drain's
-- changes channel, ARGV[11] when the batch was taken (us: its orders' "processing" mark),
-- ARGV[12] p, the number of plain commits, ARGV[13] when they committed (us; one transaction),
-- ARGV[14] m, the number of sub-lanes, then their storefronts (aligned with their keys),
-- then one per plain commit (an entry of its own storefront's sub-lane): entry id, order id, storefront id, storefront order id joined by
-- \31 (a control byte, which none of them contains; PLAIN splits them),
-- then 14 per exception (rejected, dead-lettered, re-queued, or committed at another instant):
-- entry id, outcome (committed | rejected | dead_lettered), at_us, reason,
-- deliveries, order id, storefront id, storefront order id ('' when unknown), '1' when the order
-- has a status record to update (one re-queued from the dead letters: it holds the history its
-- Postgres row cannot tell), its accepted_at_us, queue number, lane number and ahead, and the
-- sub-lane it came from ('' the base stream).
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
local lettered, settled = {}, 0
local m = tonumber(ARGV[14])
local sub_key, sub_of = {['']= stream}, {}  -- sub-lane -> its stream, and back
for j = 1, m do
  sub_key[ARGV[14 + j]] = KEYS[8 + j]
  sub_of[KEYS[8 + j]] = ARGV[14 + j]
end
local done, done_order = {}, {}  -- stream -> entry ids leaving it
local left = {}  -- sub-lane -> entries of it settled here
local function leave(sub, eid)
  local key = sub_key[sub] or stream
  if not done[key] then
    done[key] = {}
    done_order[#done_order + 1] = key
  end
  local list = done[key]
  list[#list + 1] = eid
end
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
local first_plain = 14 + m
local first_key = 8 + m
local n = (#ARGV - first_plain - p) / 14
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
  local eid, oid, sf, sfo = string.match(ARGV[first_plain + i], PLAIN)
  notify_of(sf, sfo, oid, 'committed', committed_at)
  leave(sf, eid)
  leaves(sf)
  local idem_key = KEYS[first_key + i]
  if idem_key ~= lane then
    redis.call('EXPIRE', idem_key, idem_ttl)
  end
end
for i = 0, n - 1 do
  local a = first_plain + 1 + p + i * 14
  local eid, outcome, at, reason = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local sub = ARGV[a + 13]
  local source = sub_key[sub] or stream
  local status_key, idem_key = KEYS[first_key + 1 + p + i * 2], KEYS[first_key + 2 + p + i * 2]
  local plain = outcome == 'committed' and ARGV[a + 8] ~= '1'
  if outcome == 'dead_lettered' then
    local entry = redis.call('XRANGE', source, eid, eid)
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
      local gone = redis.call('XDEL', source, eid)
      settled = settled + gone
      if gone > 0 and sub ~= '' then
        left[sub] = (left[sub] or 0) + 1
      end
      lettered[#lettered + 1] = eid
      leaves(field(entry[1][2], 'sf') or '')
      if status_key ~= lane then
        record(status_key, a, 'dead_lettered', at, reason)
      end
    end
  else
    notify_of(ARGV[a + 6], ARGV[a + 7], ARGV[a + 5], outcome, at)
    leave(sub, eid)
    leaves(ARGV[a + 6])
    if not plain and status_key ~= lane then
      record(status_key, a, outcome, at, reason)
    end
    if idem_key ~= lane then
      redis.call('EXPIRE', idem_key, idem_ttl)
    end
  end
end
local all_done = {}
for _, key in ipairs(done_order) do
  local gone = redis.call('XDEL', key, unpack(done[key]))
  settled = settled + gone
  for _, eid in ipairs(done[key]) do
    all_done[#all_done + 1] = eid
  end
  local sub = sub_of[key]
  if sub then
    left[sub] = (left[sub] or 0) + gone
  end
end
if redis.call('EXISTS', KEYS[6]) == 1 then  -- after a takeover: forget the settled ones' counts
  if #all_done > 0 then
    redis.call('HDEL', KEYS[6], unpack(all_done))
  end
  if #lettered > 0 then
    redis.call('HDEL', KEYS[6], unpack(lettered))
  end
end
-- Each storefront's share of the buffer shrinks by its orders that left (a field goes at 0, so
-- the hash's length counts the storefronts holding orders). Entries deleted by hand before
-- their settle would be counted here again: the count stops at 0.
for _, sf in ipairs(sfs) do
  local remaining = redis.call('HINCRBY', KEYS[7], sf, -by_sf[sf])
  if remaining <= 0 then
    redis.call('HDEL', KEYS[7], sf)
  end
  redis.call('HINCRBY', KEYS[8], sf, by_sf[sf])
end
-- A sub-lane's settled count and watermark: every one of its orders numbered <= 'w:<sf>' is
-- settled (the lowest number left in it, minus one, or its last when it is empty).
local low = nil  -- the lowest queue number left in the lane's streams
local function lower(seq)
  if seq and (not low or seq < low) then
    low = seq
  end
end
for j = 1, m do
  local sf = ARGV[14 + j]
  if (left[sf] or 0) > 0 then
    redis.call('HINCRBY', lane, 's:' .. sf, left[sf])
  end
  local first = redis.call('XRANGE', KEYS[8 + j], '-', '+', 'COUNT', 1)[1]
  if first then
    lower(tonumber(field(first[2], 'seq')))
  end
  if left[sf] then
    local ls = first and tonumber(field(first[2], 'ls'))
    local sw = ls and (ls - 1) or tonumber(redis.call('HGET', lane, 'n:' .. sf) or '0')
    if sw > tonumber(redis.call('HGET', lane, 'w:' .. sf) or '0') then
      redis.call('HSET', lane, 'w:' .. sf, sw)
    end
  end
end
for _, e in ipairs(redis.call('XRANGE', stream, '-', '+', 'COUNT', 4)) do
  local seq = tonumber(field(e[2], 'seq'))
  if seq then
    lower(seq)
    break
  end
end
-- The lane's watermark: every order of the lane with a queue number <= 'w' is settled. The
-- lowest queue number left in its streams, minus one, or its last admitted one when they are
-- empty; capped by ARGV[1], the lane's last as the caller last read it (its sub-lanes, all
-- given here, hold every order up to that one); it never goes down.
local last = tonumber(redis.call('HGET', lane, 'last') or '0')
local cap = tonumber(ARGV[1]) or last
local w = math.min(low and (low - 1) or last, cap, last)
local old = tonumber(redis.call('HGET', lane, 'w') or '0')
if w > old then
  redis.call('HSET', lane, 'w', w)
else
  w = old
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
