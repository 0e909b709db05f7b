#!lua
-- Mark admitted orders durable: lift the lease of their idempotency records, so their twins
-- now get the receipt instead of 409.
-- KEYS: idempotency keys.
for i = 1, #KEYS do
  local raw = redis.call('GET', KEYS[i])
  if raw and idem_tag(raw, 'p') then
    redis.call('SET', KEYS[i], idem_with(raw, 'p', nil), 'KEEPTTL')
  end
end
return #KEYS
