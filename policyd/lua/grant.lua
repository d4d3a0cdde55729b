-- grant.lua: add a credit grant to a wallet, once per grant id.
--
-- KEYS[1] wallet hash        balance, reserved (nanos)
-- KEYS[2] grant marker       exists once the grant is applied
-- KEYS[3] event stream
-- KEYS[4] gate               "open" while the partition's counters are whole: else refuse
-- KEYS[5] expiring credits   zset grant id -> expiry ms, of this customer (consumed first, earliest first)
-- KEYS[6] credit left        hash grant id -> nanos not yet consumed
-- KEYS[7] credit deadlines   zset "<customer> <grant id>" -> expiry ms, of the partition (the sweeper's list)
-- ARGV[1] grant id
-- ARGV[2] amount, nanos (0 < |x| < 2^53, checked by policyd; a negative one is a debit, never expiring)
-- ARGV[3] now, unix ms
-- ARGV[4] event payload (JSON made by policyd)
-- ARGV[5] balance ceiling, nanos (2^53 - 1): a grant may not take a balance past it, nor a debit below its negative
-- ARGV[6] expiry, unix ms ("0" = the credit never expires)
-- ARGV[7] customer id
-- ARGV[8] n: buckets a refund gives back (a request's charge returned to the money limits it counted in), then
--         KEYS[8..7+n] those buckets and ARGV[9..8+n] what each gives back, nanos (a window passed: nothing)
-- Returns {"granted", balance} | {"exists", balance} | {"too_large", balance} | {"fenced", "0"}

local function fmt(n) return string.format('%d', n) end

if redis.call('GET', KEYS[4]) ~= 'open' then
  return {'fenced', '0'}
end
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'exists', fmt(balance)}
end
local ceiling, would_be = tonumber(ARGV[5]), balance + tonumber(ARGV[2])
if would_be > ceiling or would_be < -ceiling then
  return {'too_large', fmt(balance)}
end
local after = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'reserved', '0')
redis.call('SET', KEYS[2], '1')
for i = 1, tonumber(ARGV[8] or '0') do
  if redis.call('EXISTS', KEYS[7 + i]) == 1 then
    redis.call('HINCRBY', KEYS[7 + i], 'used', '-' .. ARGV[8 + i])
  end
end
if ARGV[6] ~= '0' then
  redis.call('ZADD', KEYS[5], ARGV[6], ARGV[1])
  redis.call('HSET', KEYS[6], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[7], ARGV[6], ARGV[7] .. ' ' .. ARGV[1])
end
redis.call('XADD', KEYS[3], '*', 'type', 'grant', 'rid', ARGV[1], 'at', ARGV[3],
  'amount', ARGV[2], 'balance_after', fmt(after), 'expires', ARGV[6], 'd', ARGV[4])
return {'granted', fmt(after)}
