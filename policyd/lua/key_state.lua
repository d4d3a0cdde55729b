-- key_state.lua: set a key's state and the secrets that open it, replacing what was there.
--
-- KEYS[1] key state hash     status, h:<secret sha256> = expiry ms (0 = none)
-- ARGV[1] status: active|paused|revoked
-- ARGV[2..] pairs of secret sha256 and expiry ms
-- Returns 1.
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'status', ARGV[1])
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'h:' .. ARGV[i], ARGV[i + 1])
end
return 1
