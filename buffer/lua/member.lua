#!lua flags=allow-oom
-- allow-oom: past maxmemory the drain must still run, since it is what frees memory, and its
-- workers must keep their membership to keep their lanes.
-- Renew one worker's membership, drop the lapsed ones, list the live ones.
-- KEYS[1] the members' sorted set. ARGV[1] worker, ARGV[2] now ms, ARGV[3] lease ms.
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
return redis.call('ZRANGE', KEYS[1], 0, -1)
