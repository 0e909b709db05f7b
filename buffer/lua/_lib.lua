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

-- Two marks at once: "processing" when the batch was taken, then the outcome (one read and
-- one write of the timeline, not two of each).
local function mark2(status_key, taken_us, code, at_us)
  local tl = redis.call('HGET', status_key, 'tl')
  local add = 'processing@' .. taken_us .. ',' .. code .. '@' .. at_us
  if not tl then
    redis.call('HSET', status_key, 'tl', add)
  elseif #tl < 4000 then
    redis.call('HSET', status_key, 'tl', tl .. ',' .. add)
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
