#!lua
-- Admit a batch of orders of ONE shard, atomically per order.
-- KEYS[1] the shard's stream, KEYS[2] the global admission counter, KEYS[3] the drain hash
-- (its 's': orders settled so far, over all lanes), KEYS[4] the lane hash, then per order i:
-- its idem key.
-- ARGV[1] pending lease in ms (0 = durable on reply, no pending state), ARGV[2] the most orders
-- the buffer may hold unsettled (0 = no bound), ARGV[3] the shard, then 6 args per order:
--   nonce, storefront_id, storefront_order_id, accepted_at_us, fingerprint, body.
-- Returns one reply per order:
--   {1, order_id, seq, accepted_at_us, ahead, ls}  admitted
--   {2, order_id, seq, accepted_at_us, ahead, ls}  duplicate of an earlier order with the same body
--   {3, order_id}                                 same storefront_order_id, different body
--   {4, order_id}                                 its twin is still in flight (not yet durable)
--   {5, depth}                                    refused: the buffer holds its bound already
-- The shebang line makes Redis refuse the whole call up front when it is out of memory
-- (noeviction), so a batch is never half written.
-- Per order Redis keeps two things: the stream entry and the idempotency record. The order id
-- is minted here, ord_<shard>_<ms><seq><nonce> (sharding/ids.py), and the entry's id is
-- <ms>-<seq>: from the order id alone a gateway finds an order in flight, no status record.
-- seq is the order's queue number, global across lanes: Redis runs scripts one at a time, so
-- queue numbers grow in the order entries enter the streams. ls is its number inside its lane.
-- ahead = orders admitted earlier and not yet settled, for the customer's progress bar: exact
-- while nothing drains, a lower bound while lanes drain in parallel (buffer.position).
-- The counters are read once and written once per call, not per order.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOSTREAM buffer stream ' .. KEYS[1] .. ' is missing')
end
local CROCKFORD = '0123456789abcdefghjkmnpqrstvwxyz'
local function digits(value, width)
  local out = {}
  for i = width, 1, -1 do
    local d = value % 32
    out[i] = string.sub(CROCKFORD, d + 1, d + 1)
    value = (value - d) / 32
  end
  return table.concat(out)
end
local lease, bound, shard = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- Entry ids must grow: never below the stream's newest (a clock that stepped back, an entry
-- written by hand), and past it when that one has the same millisecond and a higher number.
local ms = now_ms
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local settled = tonumber(redis.call('HGET', KEYS[3], 's') or '0')
local issued0 = tonumber(redis.call('GET', KEYS[2]) or '0')
if newest then
  local top_ms, top_seq = string.match(newest[1], '^(%d+)-(%d+)$')
  top_ms, top_seq = tonumber(top_ms), tonumber(top_seq)
  if top_ms > ms or (top_ms == ms and top_seq > issued0) then
    ms = top_ms + (top_seq > issued0 and 1 or 0)
  end
end
local issued = issued0
local lane = redis.call('HMGET', KEYS[4], 'n', 's')
local lane_n, lane_settled = tonumber(lane[1] or '0'), tonumber(lane[2] or '0')
local head = 'ord_' .. shard .. '_' .. digits(ms, 10)
local out = {}
local n = (#ARGV - 3) / 6
for i = 0, n - 1 do
  local a = 4 + i * 6
  local idem_key = KEYS[5 + i]
  local prior = redis.call('HMGET', idem_key, 'oid', 'fp', 'seq', 'at', 'pending_until', 'a0',
    'ls')
  if prior[1] then
    if prior[2] ~= ARGV[a + 4] then
      out[#out + 1] = {3, prior[1]}
    elseif prior[5] and tonumber(prior[5]) > now_ms then
      out[#out + 1] = {4, prior[1]}
    else
      out[#out + 1] = {2, prior[1], tonumber(prior[3]), prior[4], tonumber(prior[6] or '0'),
        tonumber(prior[7] or '0')}
    end
  elseif bound > 0 and issued - settled >= bound then
    out[#out + 1] = {5, issued - settled}
  else
    issued = issued + 1
    lane_n = lane_n + 1
    local seq, ls = issued, lane_n
    local ahead = math.max(seq - 1 - settled, ls - 1 - lane_settled)
    local oid = head .. digits(seq, 11) .. ARGV[a]
    redis.call('XADD', KEYS[1], 'NOMKSTREAM', string.format('%d-%d', ms, seq),
      'v', '1', 'oid', oid, 'sf', ARGV[a + 1], 'sfo', ARGV[a + 2],
      'seq', seq, 'ls', ls, 'at', ARGV[a + 3], 'a0', ahead, 'body', ARGV[a + 5])
    redis.call('HSET', idem_key, 'oid', oid, 'fp', ARGV[a + 4], 'seq', seq, 'at', ARGV[a + 3],
      'a0', ahead, 'ls', ls)
    if lease > 0 then
      redis.call('HSET', idem_key, 'pending_until', now_ms + lease)
    end
    out[#out + 1] = {1, oid, seq, ARGV[a + 3], ahead, ls}
  end
end
if issued > issued0 then
  redis.call('SET', KEYS[2], issued)
  redis.call('HSET', KEYS[4], 'n', lane_n, 'last', issued)
end
return out
