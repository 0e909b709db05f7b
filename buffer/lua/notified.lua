#!lua
-- Events delivered: delete them from the stream they were read from, forget their retry record,
-- and add "notified" to their orders' timelines (when the status record still exists).
-- KEYS[1] source stream (the notification stream or a deferred lane), KEYS[2] retries hash,
-- then per event its order's status key (KEYS[1] when unknown).
-- ARGV[1] now_us, then 2 per event: entry id, event id. Returns the number deleted.
local deleted = 0
for i = 0, (#ARGV - 1) / 2 - 1 do
  local eid, evt = ARGV[2 + i * 2], ARGV[3 + i * 2]
  deleted = deleted + redis.call('XDEL', KEYS[1], eid)
  redis.call('HDEL', KEYS[2], evt .. ':n', evt .. ':e')
  local status_key = KEYS[3 + i]
  if status_key ~= KEYS[1] and redis.call('EXISTS', status_key) == 1 then
    mark(status_key, 'notified', ARGV[1])
  end
end
return deleted
