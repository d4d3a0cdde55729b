-- claim_polls.lua: the background responses due to be asked for, each claimed until its next turn (so that
-- one replica asks at a time; one that dies asking leaves it to whoever's turn comes next).
--
-- KEYS[1] background polls zset   request id -> when to ask next, unix ms
-- ARGV[1] now, unix ms
-- ARGV[2] the next turn of those claimed, unix ms
-- ARGV[3] how many at most
-- Returns the request ids claimed.

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, request_id in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], request_id)
end
return due
