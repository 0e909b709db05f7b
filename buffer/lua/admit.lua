#!lua
-- Admit a batch of orders, grouped by shard, atomically per order: one call per gateway batch,
-- so the counters are read and written once per batch, not per order or per shard.
-- KEYS[1] the global admission counter, KEYS[2] the drain hash (its 's': orders settled so
-- far, over all lanes), then 2 per shard group: its stream and its lane hash, then per order
-- (in group order): its idempotency key.
-- ARGV[1] pending lease in ms (0 = durable on reply, no pending state), ARGV[2] the most orders
-- the buffer may hold unsettled (0 = no bound), ARGV[3] the number of groups G, then 2 per
-- group: the shard and its number of orders, then 7 args per order:
--   nonce, storefront_id, storefront_order_id, accepted_at_us, fingerprint (8 bytes), the
--   row's columns (the entry's 'r', buffer/message.py), body.
-- Returns one reply per order, in the order given:
--   {1, order_id, seq, accepted_at_us, ahead, ls}  admitted
--   {2, order_id, seq, accepted_at_us, ahead, ls}  duplicate of an earlier order with the same body
--   {3, order_id}                                 same storefront_order_id, different body
--   {4, order_id}                                 its twin is still in flight (not yet durable)
--   {5, depth}                                    refused: the buffer holds its bound already
-- The shebang line makes Redis refuse the whole call up front when it is out of memory
-- (noeviction), so a batch is never half written.
-- Per order Redis keeps two things: the stream entry and the idempotency record (_idem.lua).
-- The order id is minted here, ord_<shard>_<ms><seq><nonce> (sharding/ids.py), and the entry's
-- id is <ms>-<seq>: from the order id alone a gateway finds an order in flight.
-- seq is the order's queue number, global across lanes: Redis runs scripts one at a time, so
-- queue numbers grow in the order entries enter the streams. ls is its number inside its lane.
-- ahead = orders admitted earlier and not yet settled, for the customer's progress bar: exact
-- while nothing drains, a lower bound while lanes drain in parallel (buffer.position).
local groups = tonumber(ARGV[3])
for g = 1, groups do
  if redis.call('EXISTS', KEYS[1 + g * 2]) == 0 then
    return redis.error_reply('NOSTREAM buffer stream ' .. KEYS[1 + g * 2] .. ' is missing')
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
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local settled = tonumber(redis.call('HGET', KEYS[2], 's') or '0')
local issued0 = tonumber(redis.call('GET', KEYS[1]) or '0')
local issued = issued0
local out = {}
-- Every idempotency record of the batch in one read and the new ones in one write, not a
-- command per order; 'written' answers a twin inside this same batch.
local first_key = 3 + groups * 2
local priors = #KEYS >= first_key and redis.call('MGET', unpack(KEYS, first_key)) or {}
local written, writes = {}, {}
local a = 4 + groups * 2  -- the next order's first arg
local k = 2 + groups * 2  -- the next order's idem key, minus one
for g = 1, groups do
  local shard, count = ARGV[2 + g * 2], tonumber(ARGV[3 + g * 2])
  local stream, lane_key = KEYS[1 + g * 2], KEYS[2 + g * 2]
  -- Entry ids must grow: never below the stream's newest (a clock that stepped back, an entry
  -- written by hand), and past it when that one has the same millisecond and a higher number.
  local ms = now_ms
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if newest then
    local top_ms, top_seq = string.match(newest[1], '^(%d+)-(%d+)$')
    top_ms, top_seq = tonumber(top_ms), tonumber(top_seq)
    if top_ms > ms or (top_ms == ms and top_seq > issued) then
      ms = top_ms + (top_seq > issued and 1 or 0)
    end
  end
  local lane = redis.call('HMGET', lane_key, 'n', 's')
  local lane_n0 = tonumber(lane[1] or '0')
  local lane_n, lane_settled = lane_n0, tonumber(lane[2] or '0')
  local head = 'ord_' .. shard .. '_'
  local ms_digits = digits(ms, 10)
  for _ = 1, count do
    k = k + 1
    local idem_key = KEYS[k]
    local fp = string.sub(ARGV[a + 4], 1, 8)
    local prior = written[idem_key] or priors[k - first_key + 1]
    if prior then
      local pfp, tail, pat, pahead, pls = struct.unpack(IDEM, prior)
      local oid = head .. tail
      local until_ms = idem_tag(prior, 'p')
      if pfp ~= fp then
        out[#out + 1] = {3, oid}
      elseif until_ms and until_ms > now_ms then
        out[#out + 1] = {4, oid}
      else
        local pseq = idem_tag(prior, 'q') or number(string.sub(tail, 11, 21))
        out[#out + 1] = {2, oid, pseq, string.format('%d', pat), pahead, pls}
      end
    elseif bound > 0 and issued - settled >= bound then
      out[#out + 1] = {5, issued - settled}
    else
      issued = issued + 1
      lane_n = lane_n + 1
      local seq, ls = issued, lane_n
      local ahead = math.max(seq - 1 - settled, ls - 1 - lane_settled)
      local tail = ms_digits .. digits(seq, 11) .. ARGV[a]
      local oid = head .. tail
      redis.call('XADD', stream, 'NOMKSTREAM', string.format('%d-%d', ms, seq),
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
      out[#out + 1] = {1, oid, seq, ARGV[a + 3], ahead, ls}
    end
    a = a + 7
  end
  if lane_n > lane_n0 then
    redis.call('HSET', lane_key, 'n', lane_n, 'last', issued)
  end
end
if issued > issued0 then
  redis.call('MSET', KEYS[1], issued, unpack(writes))
end
return out
