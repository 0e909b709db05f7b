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

-- Advance the settled watermark: every queue number <= it is settled (committed, rejected or
-- dead-lettered). It is the lowest queue number still in any stream, minus one, or the admission
-- counter when the streams are empty; it never goes down.
local function advance_watermark(drain_key, counter_key, streams, now_us)
  local low = nil
  for i = 1, #streams do
    for _, e in ipairs(redis.call('XRANGE', streams[i], '-', '+', 'COUNT', 4)) do
      local s = tonumber(field(e[2], 'seq'))
      if s then
        if not low or s < low then
          low = s
        end
        break
      end
    end
  end
  local w = low and (low - 1) or tonumber(redis.call('GET', counter_key) or '0')
  local old = tonumber(redis.call('HGET', drain_key, 'w') or '0')
  if w > old then
    redis.call('HSET', drain_key, 'w', w, 'wat', now_us)
    return w
  end
  return old
end
