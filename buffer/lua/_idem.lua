-- The idempotency record (buffer/idempotency.py owns its format), prepended to the scripts
-- that read or write it. One string of 52 bytes: the first 8 bytes of the body's fingerprint,
-- the order id's 26-char tail (after 'ord_<shard>_'), accepted_at (us), ahead at admission, the
-- lane number; then tagged extras of 9 bytes each (a tag byte and a number): 'p' the lease
-- (unix ms) of an admission not yet confirmed durable, 'q' the queue number of a re-queued
-- order, 'n' when its settlement was notified (us).
local IDEM = '>c8c26I7I5I6'
local IDEM_LEN = 52

local function idem_pack(fp, tail, at, ahead, ls)
  return struct.pack(IDEM, fp, tail, at, ahead, ls)
end

local function idem_tag(raw, tag)
  for i = IDEM_LEN + 1, #raw - 8, 9 do
    if string.sub(raw, i, i) == tag then
      return (struct.unpack('>I8', raw, i + 1))
    end
  end
  return nil
end

-- The record with its tag set to value (or removed when value is nil).
local function idem_with(raw, tag, value)
  local out = {string.sub(raw, 1, IDEM_LEN)}
  for i = IDEM_LEN + 1, #raw - 8, 9 do
    if string.sub(raw, i, i) ~= tag then
      out[#out + 1] = string.sub(raw, i, i + 8)
    end
  end
  if value then
    out[#out + 1] = tag .. struct.pack('>I8', value)
  end
  return table.concat(out)
end
