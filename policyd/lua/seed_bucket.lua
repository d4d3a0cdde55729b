-- seed_bucket.lua: start a limit's bucket from the use before the limit bound (policyd/bucket_seeds.py).
--
-- KEYS[1] bucket hash   used (units of the bucket); authorize.lua
-- KEYS[2] gate          "open" while the partition's counters are whole: else refuse (none for a cap's bucket,
--                       which is no partition's)
-- ARGV[1] "new": only a bucket nothing counts in yet (one counting holds its window's use already) | "add": add
--         to it (what requests decided under the limit's absence put in the window after the first seeding)
-- ARGV[2] the amount
-- ARGV[3] the bucket's life in seconds once made (0: for good)
-- Returns {"seeded", used after} | {"counting"} | {"fenced"}

if KEYS[2] and redis.call('GET', KEYS[2]) ~= 'open' then
  return {'fenced'}
end
local exists = redis.call('EXISTS', KEYS[1]) == 1
if exists and ARGV[1] == 'new' then
  return {'counting'}
end
local used = redis.call('HINCRBY', KEYS[1], 'used', ARGV[2])
local ttl = tonumber(ARGV[3])
if not exists and ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
end
return {'seeded', string.format('%d', used)}
