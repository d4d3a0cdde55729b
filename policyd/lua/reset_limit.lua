-- reset_limit.lua: forgive what a limit's bucket counted in its current window (an operator's reset).
--
-- KEYS[1] bucket hash   used (units of the bucket), a<pct>:<label> = that limit alerted, reached:<label> = refused
--                       at that limit (alerted); authorize.lua
-- KEYS[2] gate          "open" while the partition's counters are whole: else refuse (none for a cap's bucket,
--                       which is no partition's)
-- ARGV[1] the amount to take out (what the bucket's settled requests put in it): at most what it holds above
--         ARGV[2]; negative: given back
-- ARGV[2] the least it may hold after: 0, or below zero by what a previous window left unused (rollover.py)
-- ARGV[3..] pairs of an alert's field and the amount that crosses it, of each limit counting in the bucket: those
--         no longer reached alert again at their next crossing
-- Returns {"reset", taken, used after} | {"absent"} (nothing counted in this window) | {"fenced"}

if KEYS[2] and redis.call('GET', KEYS[2]) ~= 'open' then
  return {'fenced'}
end
local used = redis.call('HGET', KEYS[1], 'used')
if not used then
  return {'absent'}
end
local taken = tonumber(ARGV[1])
if taken > 0 then  -- a negative amount gives back what a reset took (its record could not be kept)
  taken = math.max(math.min(taken, tonumber(used) - tonumber(ARGV[2])), 0)
end
local after = tonumber(used)
if taken ~= 0 then
  after = redis.call('HINCRBY', KEYS[1], 'used', string.format('%d', -taken))
end
if taken > 0 then  -- room again: the next refusal at each of its limits alerts again
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 8) == 'reached:' then
      redis.call('HDEL', KEYS[1], field)
    end
  end
end
for i = 3, #ARGV - 1, 2 do
  if after < tonumber(ARGV[i + 1]) then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return {'reset', string.format('%d', taken), string.format('%d', after)}
