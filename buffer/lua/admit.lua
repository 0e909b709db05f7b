#!lua
-- Admit a batch of orders, grouped by shard, atomically per order: one call per gateway batch,
-- so the counters are read and written once per batch, not per order or per shard.
-- KEYS[1] the global admission counter, KEYS[2] the drain hash (its 's': orders settled so
-- far, over all lanes), KEYS[3..6] the storefronts' limits, rate-limit state (GCRA) and
-- buffered counts, and the set of those with an API key (buffer/storefronts.py), then 2 per
-- shard group: its base stream (which must exist: a lost one means Redis lost its data) and
-- its lane hash, then 2 per order (in group order): its idempotency key and its storefront's
-- sub-lane in its lane (Keys.sublane: a stream, made by its first order).
-- ARGV[1] pending lease in ms (0 = durable on reply, no pending state), ARGV[2] the most orders
-- the buffer may hold unsettled (0 = no bound), ARGV[3] the default rate (orders/s, 0 = none)
-- and ARGV[4] burst of a storefront without a limit of its own, ARGV[5] the reserve: once
-- the buffer holds bound - reserve, a storefront holding its share ((bound - reserve) /
-- storefronts with orders buffered) or more is refused, ARGV[6] the number of groups G, then 2 per
-- group: the shard and its number of orders, then 7 args per order:
--   nonce, storefront_id, storefront_order_id, accepted_at_us, fingerprint (8 bytes), the
--   row's columns (the entry's 'r', buffer/message.py), body.
-- Returns one reply per order, in the order given, each {code, q, w, r, t, ...}: q/w the
-- storefront's rate-limit policy (burst, its window in s; q = 0: not limited), r the orders it
-- may still send at once, t the ms until it may send q again (or, refused for its rate, until
-- it may send one), then by code:
--   1, order_id, seq, accepted_at_us, ahead, ls   admitted
--   2, order_id, seq, accepted_at_us, ahead, ls   duplicate of an earlier order with the same body
--   3, order_id                                   same storefront_order_id, different body
--   4, order_id                                   its twin is still in flight (not yet durable)
--   5, depth                                      refused: the buffer holds its bound already
--   6                                             refused: the storefront's rate limit
--   7, held, share                                refused: the storefront holds its share
-- A replayed order (2, 3, 4) costs no token and is never refused: only new orders count.
-- The shebang line makes Redis refuse the whole call up front when it is out of memory
-- (noeviction), so a batch is never half written.
-- Per order Redis keeps two things: the stream entry and the idempotency record (_idem.lua).
-- The order id is minted here, ord_<shard>_<ms><seq><nonce> (sharding/ids.py), and the entry's
-- id is <ms>-<seq>: from the order id and its storefront a gateway finds an order in flight.
-- seq is the order's queue number, global across lanes: Redis runs scripts one at a time, so
-- queue numbers grow in the order entries enter the streams. Each lane holds one sub-lane per
-- storefront, drained by weight (buffer.fairness); ls is the order's number in its sub-lane
-- (lane hash 'n:<sf>'), and ahead the orders of that sub-lane before it, not yet settled.
local groups = tonumber(ARGV[6])
for g = 1, groups do
  if redis.call('EXISTS', KEYS[5 + g * 2]) == 0 then
    return redis.error_reply('NOSTREAM buffer stream ' .. KEYS[5 + g * 2] .. ' is missing')
  end
end
local CROCKFORD = {string.byte('0123456789abcdefghjkmnpqrstvwxyz', 1, 32)}
local function digits(value, width)
  local out = {}
  for i = width, 1, -1 do
    local d = value % 32
    out[i] = CROCKFORD[d + 1]
    value = (value - d) / 32
  end
  return string.char(unpack(out))
end
local function number(text)
  local value = 0
  for i = 1, #text do
    local c = string.byte(text, i)
    for d = 1, 32 do
      if CROCKFORD[d] == c then
        value = value * 32 + d - 1
        break
      end
    end
  end
  return value
end
local lease, bound = tonumber(ARGV[1]), tonumber(ARGV[2])
local default_rate, default_burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local reserve = tonumber(ARGV[5])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local settled = tonumber(redis.call('HGET', KEYS[2], 's') or '0')
local issued0 = tonumber(redis.call('GET', KEYS[1]) or '0')
local issued = issued0
-- Each storefront of the batch, read once: its limit and its rate limit's state (its buffered
-- orders only when the share rule needs them). The rate limit is GCRA, a token bucket kept as one time: 'tat', when the bucket is
-- full again; an order costs T = 1/rate, and passes while tat + T - now <= burst * T.
local storefronts, touched = {}, {}
local active = nil  -- storefronts with orders buffered, read when the share rule needs it
local function storefront(sf)
  local s = storefronts[sf]
  if s then
    return s
  end
  local rate, burst = default_rate, default_burst
  local own = redis.call('HGET', KEYS[3], sf)
  if own then
    local r, b = string.match(own, '^(%S+) (%S+)')
    rate, burst = tonumber(r) or 0, tonumber(b) or 1
  end
  s = {id = sf, admitted = 0, rate = rate}
  if rate > 0 then
    s.T = 1000000 / rate
    s.tau = math.max(1, burst) * s.T
    s.q = math.max(1, burst)
    s.w = math.max(1, math.ceil(s.q / rate))
    s.tat = math.max(tonumber(redis.call('HGET', KEYS[4], sf) or '0'), now_us)
  end
  storefronts[sf] = s
  touched[#touched + 1] = sf
  return s
end
-- The share rule: past bound - reserve, a storefront may hold at most (bound - reserve) / n
-- orders, n the storefronts with orders buffered (itself included), so the reserve stays for
-- the storefronts below their share, one that had nothing buffered included. It applies only
-- where more than one storefront has an API key: a single storefront may fill the bound.
local function held(s)  -- the storefront's orders buffered, this batch's included
  if not s.held0 then
    s.held0 = tonumber(redis.call('HGET', KEYS[5], s.id) or '0')
  end
  return s.held0 + s.admitted
end
local function over_share(sf)
  if bound <= 0 or reserve <= 0 or issued - settled < bound - reserve then
    return nil
  end
  if not active then
    active = redis.call('HLEN', KEYS[5])
    if redis.call('SCARD', KEYS[6]) <= 1 then
      reserve = 0
    end
  end
  if reserve <= 0 then
    return nil
  end
  local n = 0  -- storefronts holding orders: those of before, this batch's newcomers, itself
  for _, id in ipairs(touched) do
    local s = storefronts[id]
    if s.admitted > 0 and held(s) == s.admitted then
      n = n + 1
    end
  end
  local mine = held(sf)
  n = active + n + ((mine == 0) and 1 or 0)
  local share = math.floor((bound - reserve) / n)
  if mine >= share then
    return share
  end
  return nil
end
local function limit_of(s)  -- q, w, r, t of the storefront's state now
  if not s.T then
    return 0, 0, 0, 0
  end
  local used = s.tat - now_us
  return s.q, s.w, math.floor((s.tau - used) / s.T + 1e-6), math.ceil(used / 1000)
end
local out = {}
-- Every idempotency record of the batch in one read and the new ones in one write, not a
-- command per order; 'written' answers a twin inside this same batch.
local first_key = 7 + groups * 2
local idem_keys = {}
for i = first_key, #KEYS, 2 do
  idem_keys[#idem_keys + 1] = KEYS[i]
end
local priors = {}  -- idem key -> its record, for those that have one
if #idem_keys > 0 then
  for i, raw in ipairs(redis.call('MGET', unpack(idem_keys))) do
    if raw then
      priors[idem_keys[i]] = raw
    end
  end
end
local written, writes = {}, {}
local replayed = nil  -- a lane key, once a receipt is given again (code 2)
local a = 7 + groups * 2  -- the next order's first arg
local k = 5 + groups * 2  -- the next order's keys (idem, sub-lane), minus two
for g = 1, groups do
  local shard, count = ARGV[5 + g * 2], tonumber(ARGV[6 + g * 2])
  local lane_key = KEYS[6 + g * 2]
  -- Entry ids are <ms>-<seq>, seq growing: ms never goes below the lane's last one (a clock
  -- that stepped back), so every sub-lane's ids grow.
  local lane = redis.call('HMGET', lane_key, 'n', 'ms')
  local lane_n0 = tonumber(lane[1] or '0')
  local lane_n = lane_n0
  local ms = math.max(now_ms, tonumber(lane[2] or '0'))
  local head = 'ord_' .. shard .. '_'
  local ms_digits = digits(ms, 10)
  local subs, sub_order = {}, {}  -- storefront -> {n, s} of its sub-lane in this lane
  local function sub(id)
    local u = subs[id]
    if not u then
      local raw = redis.call('HMGET', lane_key, 'n:' .. id, 's:' .. id)
      u = {n0 = tonumber(raw[1] or '0'), s = tonumber(raw[2] or '0')}
      u.n = u.n0
      subs[id] = u
      sub_order[#sub_order + 1] = id
    end
    return u
  end
  for _ = 1, count do
    k = k + 2
    local idem_key, sub_key = KEYS[k], KEYS[k + 1]
    local fp = string.sub(ARGV[a + 4], 1, 8)
    local prior = written[idem_key] or priors[idem_key]
    local sf = storefront(ARGV[a + 1])
    local q, w, r, ms_full = limit_of(sf)
    if prior then
      local pfp, tail, pat, pahead, pls = struct.unpack(IDEM, prior)
      local oid = head .. tail
      local until_ms = idem_tag(prior, 'p')
      if pfp ~= fp then
        out[#out + 1] = {3, q, w, r, ms_full, oid}
      elseif until_ms and until_ms > now_ms then
        out[#out + 1] = {4, q, w, r, ms_full, oid}
      else
        local pseq = idem_tag(prior, 'q') or number(string.sub(tail, 11, 21))
        out[#out + 1] = {2, q, w, r, ms_full, oid, pseq, string.format('%d', pat), pahead, pls}
        replayed = lane_key
      end
    elseif bound > 0 and issued - settled >= bound then
      out[#out + 1] = {5, q, w, r, ms_full, issued - settled}
    elseif over_share(sf) then
      out[#out + 1] = {7, q, w, r, ms_full, held(sf), over_share(sf)}
    elseif sf.T and sf.tat + sf.T - now_us > sf.tau + 0.001 then
      out[#out + 1] = {6, q, w, 0, math.ceil((sf.tat + sf.T - sf.tau - now_us) / 1000)}
    else
      if sf.T then
        sf.tat = sf.tat + sf.T
        q, w, r, ms_full = limit_of(sf)
      end
      sf.admitted = sf.admitted + 1
      issued = issued + 1
      lane_n = lane_n + 1
      local u = sub(ARGV[a + 1])
      u.n = u.n + 1
      -- ls: its number in its storefront's sub-lane; ahead: that sub-lane's orders before it
      local seq, ls = issued, u.n
      local ahead = ls - 1 - u.s
      local tail = ms_digits .. digits(seq, 11) .. ARGV[a]
      local oid = head .. tail
      redis.call('XADD', sub_key, string.format('%d-%d', ms, seq),
        'v', '1', 'oid', oid, 'sf', ARGV[a + 1], 'sfo', ARGV[a + 2],
        'seq', seq, 'ls', ls, 'at', ARGV[a + 3], 'a0', ahead, 'r', ARGV[a + 5],
        'body', ARGV[a + 6])
      local record = idem_pack(fp, tail, tonumber(ARGV[a + 3]), ahead, ls)
      if lease > 0 then
        record = record .. 'p' .. struct.pack('>I8', now_ms + lease)
      end
      written[idem_key] = record
      writes[#writes + 1] = idem_key
      writes[#writes + 1] = record
      out[#out + 1] = {1, q, w, r, ms_full, oid, seq, ARGV[a + 3], ahead, ls}
    end
    a = a + 7
  end
  if lane_n > lane_n0 then
    local fields = {'n', lane_n, 'last', issued, 'ms', ms}
    for _, id in ipairs(sub_order) do
      local u = subs[id]
      if u.n > u.n0 then
        fields[#fields + 1] = 'n:' .. id
        fields[#fields + 1] = u.n
      end
    end
    redis.call('HSET', lane_key, unpack(fields))
  end
end
if issued > issued0 then
  redis.call('MSET', KEYS[1], issued, unpack(writes))
  for _, id in ipairs(touched) do
    local sf = storefronts[id]
    if sf.admitted > 0 then
      redis.call('HINCRBY', KEYS[5], id, sf.admitted)
      if sf.T then
        redis.call('HSET', KEYS[4], id, string.format('%.17g', sf.tat))
      end
    end
  end
end
-- A receipt given again must be as durable as the first one. WAIT and WAITAOF wait for the
-- replication offset (or fsync) of the caller's connection's last write, which may predate the
-- order's own write (made by another connection or gateway): a write of this call moves it to
-- now, so the batch's barrier covers every write before it, the replayed order's included.
if replayed and issued == issued0 then
  redis.call('HSET', replayed, 'seen', now_ms)
end
return out
