-- restore_closed.lua: write closed reservations back after Redis lost its data (a rebuild of the counters,
-- from their records in SQL), so a retry of a request settled or released before the loss is answered as
-- before it, not served and charged again. Each is written only where its hash is absent: the decisions run
-- meanwhile, and a request that took the id since is left as it is.
--
-- KEYS[1..n] reservation hashes, all of one partition
-- ARGV, for each key in turn: seconds to keep it, the number of its fields, then field, value, ...
-- Returns the number written.

local written = 0
local at = 1
for i = 1, #KEYS do
  local seconds = ARGV[at]
  local count = tonumber(ARGV[at + 1])
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], unpack(ARGV, at + 2, at + 1 + 2 * count))
    redis.call('EXPIRE', KEYS[i], seconds)
    written = written + 1
  end
  at = at + 2 + 2 * count
end
return written
