-- release.lua: void a reservation (provider error, client gone) or expire it (nobody settled).
--
-- KEYS[1] reservation hash   state = reserved|expired|settled|released; slot = returned (extend_hold.lua);
--                            created = its authorization's ms, told to the writer (a later request reusing the
--                            id, once this hash is gone, is recorded apart)
-- KEYS[2] wallet hash        balance, reserved (nanos)
-- KEYS[3] deadlines zset
-- KEYS[4] in-flight counter  of the key
-- KEYS[5] event stream
-- KEYS[6] gate               "open" while the partition's counters are whole: else refuse
-- KEYS[7..6+n] bucket hashes of the reservation
-- ARGV[1] request_id
-- ARGV[2] now, unix ms
-- ARGV[3] "released" or "expired": the state to move to
-- ARGV[4] reason (e.g. provider_error, client_disconnected, deadline)
-- ARGV[5] result retention, seconds
-- ARGV[6] n buckets, then 1 per bucket: the negative reserved amount
-- ARGV[7+n..] released: the facts the reservation keeps in place of field "r", as field, value, ... (made by
--           policyd: what answering a retry reads), the hash written anew of small fields so Redis keeps it as
--           a listpack; none when expired (a late settle still needs them all)
-- Returns {"released"|"expired", amount} | {"already", state} | {"unknown"} | {"not_due"} | {"fenced"}

if redis.call('GET', KEYS[6]) ~= 'open' then
  return {'fenced'}
end
local function negative(text) return text == '0' and '0' or '-' .. text end

local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return {'unknown'}
end
if state ~= 'reserved' then
  return {'already', state}
end
local target = ARGV[3]
if target == 'expired' then
  local expires = tonumber(redis.call('HGET', KEYS[1], 'expires'))
  if expires > tonumber(ARGV[2]) then
    return {'not_due'}
  end
end
local held = redis.call('HMGET', KEYS[1], 'amount', 'slot', 'created')
local amount = held[1]
redis.call('HINCRBY', KEYS[2], 'reserved', negative(amount))
if held[2] ~= 'returned' then  -- the key's concurrency slot, unless given back already past the deadline
  redis.call('DECR', KEYS[4])
end
redis.call('ZREM', KEYS[3], ARGV[1])
local bucket_count = tonumber(ARGV[6])
for i = 1, bucket_count do
  redis.call('HINCRBY', KEYS[6 + i], 'used', ARGV[6 + i])
end
if #ARGV > 6 + bucket_count then  -- released: written anew with the facts answering a retry reads, kept small
  local kept = redis.call('HMGET', KEYS[1], 'key', 'expires')
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'key', kept[1], 'amount', amount, 'expires', kept[2], 'created', held[3] or '',
    unpack(ARGV, 7 + bucket_count))
end
redis.call('HSET', KEYS[1], 'state', target)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[5], '*', 'type', target == 'expired' and 'expire' or 'release', 'rid', ARGV[1],
  'at', ARGV[2], 'reason', ARGV[4], 'released', amount, 'created', held[3] or '')
return {target, amount}
