#!lua
-- Mark admitted orders of ONE shard durable: their twins now get the receipt instead of 409.
-- KEYS: idem keys.
for i = 1, #KEYS do
  redis.call('HDEL', KEYS[i], 'pending_until')
end
return #KEYS
