-- A claim ends, if its holder still has it: a claim that ran out and was taken by another stays the other's.
-- KEYS[1] the claim; ARGV[1] its holder (a request id)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
