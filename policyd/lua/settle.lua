-- settle.lua: turn a reservation into the actual charge, once.
--
-- KEYS[1] reservation hash   state = reserved|expired|settled|released; slot = returned (extend_hold.lua);
--                            created = its authorization's ms, told to the writer
-- KEYS[2] wallet hash        balance, reserved (nanos)
-- KEYS[3] deadlines zset
-- KEYS[4] in-flight counter  of the key
-- KEYS[5] event stream
-- KEYS[6] gate               "open" while the partition's counters are whole: else refuse
-- KEYS[7] expiring credits   zset grant id -> expiry ms (a charge consumes them first, earliest first)
-- KEYS[8] credit left        hash grant id -> nanos not yet consumed
-- KEYS[9..8+n] bucket hashes of the reservation
-- ARGV[1] request_id
-- ARGV[2] now, unix ms
-- ARGV[3] fingerprint of the settle numbers (a retry must bring the same)
-- ARGV[4] charge, nanos (0 <= x < 2^53)
-- ARGV[5] negative charge, "-" .. ARGV[4] (so no number is formatted here)
-- ARGV[6] result retention, seconds
-- ARGV[7] event payload (JSON made by policyd)
-- ARGV[8] n buckets, then 2 per bucket: delta while reserved (actual - reserved), delta after expiry (actual)
-- ARGV[9+2n]  balances whose crossing downward by this charge is an alert, nanos, "a,b" ("" = none)
-- ARGV[10+2n] the wallet's id (a customer, or "<customer>/<workspace>")
-- ARGV[11+2n..] the facts the settled reservation keeps in place of field "r", as field, value, ... (made by
--             policyd: what answering a retry reads); the hash is written anew of small fields, so Redis keeps
--             it as a listpack for its retention
-- Returns {"settled"|"settled_late", balance_before, balance_after}
--       | {"exists", balance_before, balance_after} | {"conflict"} | {"released"} | {"unknown"} | {"fenced"}

local function fmt(n) return string.format('%d', n) end
-- the negation of a decimal string; "-0" is not an integer to Redis
local function negative(text) return text == '0' and '0' or '-' .. text end

if redis.call('GET', KEYS[6]) ~= 'open' then
  return {'fenced'}
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return {'unknown'}
end
if state == 'settled' then
  local stored = redis.call('HMGET', KEYS[1], 'fingerprint', 'balance_before', 'balance_after')
  if stored[1] == ARGV[3] then
    return {'exists', stored[2], stored[3]}
  end
  return {'conflict'}
end
if state == 'released' then
  return {'released'}
end

local was_reserved = state == 'reserved'
local held = redis.call('HMGET', KEYS[1], 'wallet', 'amount', 'slot', 'created')
local holds_wallet = held[1] == '1'
local reserved_amount = held[2]
local before = redis.call('HGET', KEYS[2], 'balance') or '0'
if was_reserved then
  redis.call('HINCRBY', KEYS[2], 'reserved', negative(reserved_amount))
  if held[3] ~= 'returned' then  -- the key's concurrency slot, unless given back already past the deadline
    redis.call('DECR', KEYS[4])
  end
  redis.call('ZREM', KEYS[3], ARGV[1])
end
local after = redis.call('HINCRBY', KEYS[2], 'balance', ARGV[5])
-- which expiring credits pay for this charge (the rest comes from credit that never expires)
local consumed = {}
local to_consume = tonumber(ARGV[4])
if to_consume > 0 then
  local grants = redis.call('ZRANGEBYSCORE', KEYS[7], '(' .. ARGV[2], '+inf')
  for _, grant in ipairs(grants) do
    if to_consume <= 0 then break end
    local left = tonumber(redis.call('HGET', KEYS[8], grant) or '0')
    local take = math.min(left, to_consume)
    if take > 0 then
      local remaining = redis.call('HINCRBY', KEYS[8], grant, negative(fmt(take)))
      to_consume = to_consume - take
      consumed[#consumed + 1] = grant .. ':' .. fmt(take)
      if remaining <= 0 then
        redis.call('HDEL', KEYS[8], grant)
        redis.call('ZREM', KEYS[7], grant)
      end
    end
  end
end
local bucket_count = tonumber(ARGV[8])
for i = 1, bucket_count do
  local delta = was_reserved and ARGV[8 + (i - 1) * 2 + 1] or ARGV[8 + (i - 1) * 2 + 2]
  redis.call('HINCRBY', KEYS[8 + i], 'used', delta)
end
local outcome = was_reserved and 'settled' or 'settled_late'
local after_text = fmt(after)
local kept = redis.call('HMGET', KEYS[1], 'key', 'expires')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'settled', 'key', kept[1], 'amount', reserved_amount, 'expires', kept[2],
  'created', held[4] or '', 'fingerprint', ARGV[3], 'balance_before', before, 'balance_after', after_text,
  unpack(ARGV, 11 + bucket_count * 2))
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('XADD', KEYS[5], '*', 'type', 'settle', 'rid', ARGV[1], 'at', ARGV[2], 'outcome', outcome,
  'charge', ARGV[4], 'balance_before', before, 'balance_after', after_text,
  'released', was_reserved and reserved_amount or '0', 'wallet', holds_wallet and '1' or '0',
  'credits', table.concat(consumed, ','), 'created', held[4] or '', 'fingerprint', ARGV[3], 'd', ARGV[7])
-- a prepaid wallet's balance taken below an alert amount by this charge (once a crossing: a grant re-arms it)
local marks = ARGV[9 + bucket_count * 2]
if holds_wallet and marks and marks ~= '' then
  local wallet_id = ARGV[10 + bucket_count * 2]
  local before_amount = tonumber(before)
  for threshold in string.gmatch(marks, '(%d+)') do
    local amount = tonumber(threshold)
    if before_amount >= amount and after < amount then
      redis.call('XADD', KEYS[5], '*', 'type', 'alert', 'rid', ARGV[1], 'at', ARGV[2], 'label', 'low-balance',
        'customer_id', string.match(wallet_id, '^[^/]*'), 'wallet_id', wallet_id, 'below', threshold,
        'balance', after_text)
    end
  end
end
return {outcome, before, after_text}
