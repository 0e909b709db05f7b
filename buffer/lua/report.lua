#!lua flags=allow-oom
-- allow-oom: the lanes' reports are what customers' ETAs and the operators' screens read, and
-- past maxmemory is when they matter most.
-- A lane's report: set its fields, drop 'cap' when none is in force, tell the gateways.
-- KEYS[1] the lane hash. ARGV[1] the changes channel, ARGV[2] '1' to drop 'cap', then field,
-- value pairs.
if ARGV[2] == '1' then
  redis.call('HDEL', KEYS[1], 'cap')
end
if #ARGV > 2 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
end
redis.call('PUBLISH', ARGV[1], 'lane')
return 1
