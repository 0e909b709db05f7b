#!lua
-- Events delivered: delete them from the stream they were read from, forget their retry record,
-- and note "notified" for their orders: on the status record if the order still has one
-- (rejected, dead-lettered, re-queued), else on its idempotency record (a committed order's
-- status comes from its Postgres row; the note lasts as long as the idempotency record).
-- KEYS[1] source stream (the notification stream or a deferred lane), KEYS[2] retries hash,
-- then per event its order's status key and idempotency key (KEYS[1] when unknown).
-- ARGV[1] now_us, then 2 per event: entry id, event id. Returns the number deleted.
local deleted = 0
for i = 0, (#ARGV - 1) / 2 - 1 do
  local eid, evt = ARGV[2 + i * 2], ARGV[3 + i * 2]
  deleted = deleted + redis.call('XDEL', KEYS[1], eid)
  redis.call('HDEL', KEYS[2], evt .. ':n', evt .. ':e')
  local status_key, idem_key = KEYS[3 + i * 2], KEYS[4 + i * 2]
  if status_key ~= KEYS[1] and redis.call('EXISTS', status_key) == 1 then
    mark(status_key, 'notified', ARGV[1])
  elseif idem_key ~= KEYS[1] then
    local raw = redis.call('GET', idem_key)
    if raw then
      redis.call('SET', idem_key, idem_with(raw, 'n', tonumber(ARGV[1])), 'KEEPTTL')
    end
  end
end
return deleted
