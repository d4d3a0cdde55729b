-- key_state.lua: set a key's state and the secrets that open it, replacing what was there,
-- and record the change in the partition's stream (so the order against decisions is provable).
--
-- KEYS[1] key state hash     status, expires = the key's end, ms (0 = none), h:<secret sha256> = expiry ms (0 = none),
--                            terms = the fingerprint of the key's plan, scopes and own limits (authorize.lua compares it)
-- KEYS[2] event stream       of the partition
-- ARGV[1] status: active|paused|revoked
-- ARGV[2] now, unix ms
-- ARGV[3] key id
-- ARGV[4] customer id
-- ARGV[5] the key's expiry, unix ms (0 = never)
-- ARGV[6] the terms fingerprint
-- ARGV[7] the plan (recorded with the change)
-- ARGV[8..] pairs of secret sha256 and expiry ms
-- Returns 1.
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'expires', ARGV[5], 'terms', ARGV[6])
for i = 8, #ARGV, 2 do
  redis.call('HSET', KEYS[1], 'h:' .. ARGV[i], ARGV[i + 1])
end
redis.call('XADD', KEYS[2], '*', 'type', 'key_state', 'rid', ARGV[3], 'at', ARGV[2], 'status', ARGV[1],
  'customer_id', ARGV[4], 'plan', ARGV[7])
return 1
