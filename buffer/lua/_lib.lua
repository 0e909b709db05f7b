-- Shared helpers, prepended to the scripts that need them (buffer/scripts.py).

local function field(fields, name)
  for j = 1, #fields, 2 do
    if fields[j] == name then
      return fields[j + 1]
    end
  end
  return nil
end

-- Append a state change to the order's timeline: "code@microseconds", comma separated.
local function mark(status_key, code, at_us)
  local tl = redis.call('HGET', status_key, 'tl')
  if not tl then
    redis.call('HSET', status_key, 'tl', code .. '@' .. at_us)
  elseif #tl < 4000 then
    redis.call('HSET', status_key, 'tl', tl .. ',' .. code .. '@' .. at_us)
  end
end

-- The status key of an entry, or nil when its order id does not belong to shard `shard`.
local function status_key_of(prefix, shard, fields)
  local oid = field(fields, 'oid')
  local head = 'ord_' .. shard .. '_'
  if oid and string.sub(oid, 1, #head) == head then
    return prefix .. ':{' .. shard .. '}:order:' .. oid
  end
  return nil
end

-- A worker took the entry: its order (if its status record still exists) is "processing".
local function mark_processing(prefix, shard, fields, at_us)
  local key = status_key_of(prefix, shard, fields)
  if key and redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'status', 'processing')
    mark(key, 'processing', at_us)
  end
end

-- Refuse a call from a deposed lane owner: the lane's epoch moved on when its successor took
-- the lane (buffer.lanes.claim_lane), so nothing it takes or settles can land behind them.
local function fenced(lane_key, epoch)
  local current = redis.call('HGET', lane_key, 'epoch') or '0'
  if current ~= epoch then
    return redis.error_reply('FENCED lane epoch is ' .. current .. ', not ' .. epoch)
  end
  return nil
end
