-- expire_credit.lua: remove what is left of an expiring credit grant from the wallet, once.
--
-- KEYS[1] wallet hash        balance, reserved (nanos)
-- KEYS[2] expiring credits   zset grant id -> expiry ms, of this customer
-- KEYS[3] credit left        hash grant id -> nanos not yet consumed
-- KEYS[4] credit deadlines   zset "<customer> <grant id>" -> expiry ms, of the partition
-- KEYS[5] event stream
-- KEYS[6] gate               "open" while the partition's counters are whole: else refuse
-- ARGV[1] grant id
-- ARGV[2] now, unix ms
-- ARGV[3] customer id
-- Returns {"expired", amount removed} | {"not_due", "0"} | {"fenced", "0"}

local function fmt(n) return string.format('%d', n) end
-- the negation of a decimal string; "-0" is not an integer to Redis
local function negative(text) return text == '0' and '0' or '-' .. text end

if redis.call('GET', KEYS[6]) ~= 'open' then
  return {'fenced', '0'}
end
local member = ARGV[3] .. ' ' .. ARGV[1]
local due = redis.call('ZSCORE', KEYS[4], member)
if not due or tonumber(due) > tonumber(ARGV[2]) then
  return {'not_due', '0'}
end
local left = redis.call('HGET', KEYS[3], ARGV[1]) or '0'
redis.call('ZREM', KEYS[4], member)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
local after = redis.call('HINCRBY', KEYS[1], 'balance', negative(left))
redis.call('XADD', KEYS[5], '*', 'type', 'credit_expire', 'rid', ARGV[1], 'at', ARGV[2], 'amount', left,
  'balance_after', fmt(after), 'customer_id', ARGV[3])
return {'expired', left}
