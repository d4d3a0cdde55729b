-- authorize.lua: check a key and reserve an estimated charge, all or nothing.
--
-- Every key is in one owner partition (one Redis Cluster slot, hash tag {pN}).
-- KEYS[1] key state hash     status = active|paused|revoked, expires = the key's end ms (0 or absent = none),
--                            h:<secret sha256> = expiry ms (0 = none), terms = the fingerprint of its plan, scopes and own limits
-- KEYS[2] wallet hash        balance, reserved (nanos)
-- KEYS[3] reservation hash   created here
-- KEYS[4] deadlines zset     request_id -> expiry ms
-- KEYS[5] in-flight counter  of the key
-- KEYS[6] event stream       of the partition
-- KEYS[7] gate               "open" while the partition's counters are whole: else refuse
-- KEYS[8]  the customer's end users' terms: end user id -> the stamp of its own limits (none there: none)
-- KEYS[9..8+n] bucket hashes used (units of the bucket), a<pct>:<label> = that limit alerted, reached:<label> = a
--          request refused at that limit (alerted once a window). Two limits of a plan may count in one bucket (a
--          block limit and a shadow one beside it, a downgrade before a block): its key is given once for each,
--          each checks its own limit, and the request is counted in it once.
-- KEYS[9+n] (standalone Redis only) the request index, request_id -> partition, which a Settle sent
--          to another process reads; in a Redis Cluster it lives in another slot and is set apart
-- ARGV[1]  request_id
-- ARGV[2]  secret sha256 (hex)
-- ARGV[3]  now, unix ms
-- ARGV[4]  reservation expiry, unix ms
-- ARGV[5]  "1" = the wallet must cover the reservation, "0" = no wallet check
-- ARGV[6]  reserved charge, nanos (string of an integer, 0 <= x < 2^53)
-- ARGV[7]  concurrency cap of the key (0 = none)
-- ARGV[8]  event payload (JSON made by policyd, opaque here)
-- ARGV[9]  reservation fields (JSON made by policyd, stored opaque in field "r")
-- ARGV[10] a denial policy already decided ("" = none), returned once the key itself is known good,
--          so a paused or revoked key is always reported as such first
-- ARGV[11] the fingerprint of the key's plan, scopes and own limits the decision was made under: when the key state
--          holds another (the operator changed them), nothing is done and {"stale"} is returned, so
--          policyd reads the key again and decides anew
-- ARGV[12] the end user whose own limits the decision was made under ("" = none looked up), ARGV[13] their stamp
--          ("" = it had none): when KEYS[8] holds another for it (the operator changed them), nothing is done and
--          {"stale", "end_user"} is returned, so policyd reads them again and decides anew
-- ARGV[14] n buckets, then 6 per bucket:
--          amount, limit, mode (block|shadow), ttl seconds (0 = none; negative: renewed by every hold), thresholds ("pct:amount,..."), label
-- ARGV[15+6n] the partition (with KEYS[9+n]); ARGV[16+6n] the index's lifetime, seconds
--
-- Numbers: every amount is an integer below 2^53, so Lua doubles hold them exactly;
-- mutations use HINCRBY/INCRBY with the ARGV strings; numbers become strings only
-- through string.format('%d'), never tostring (which rounds to 14 digits).
-- Returns {"allow", reserved, shadow labels "a|b", each bucket's use after it "u1,u2,..."}
--       | {"deny", reason, label[, the room the wallet or the limit had left: what it could still hold]}
--       | {"exists", state, "1" when the same key made it} (state "elsewhere": another partition's request holds
--         the id) | {"fenced"} | {"stale"} | {"stale", "end_user"}.

local function fmt(n) return string.format('%d', n) end

local request_id = ARGV[1]
local secret_field = 'h:' .. ARGV[2]
local now_ms = tonumber(ARGV[3])
local expires_ms = ARGV[4]
local check_wallet = ARGV[5] == '1'
local amount = tonumber(ARGV[6])
local concurrency_cap = tonumber(ARGV[7])
local payload = ARGV[8]
local reservation_fields = ARGV[9]
local preset_denial = ARGV[10]
local terms = ARGV[11]
local end_user = ARGV[12]
local end_user_stamp = ARGV[13]
local bucket_count = tonumber(ARGV[14])

-- a bucket's life: renewed by every hold (negative ttl: a thread's budget, forgotten once idle), else set once
local function keep(key, ttl)
  if ttl < 0 then
    redis.call('EXPIRE', key, -ttl)
  elseif ttl > 0 and redis.call('TTL', key) < 0 then
    redis.call('EXPIRE', key, ttl)
  end
end

local function record(outcome, reason, label, extra)
  redis.call('XADD', KEYS[6], '*', 'type', 'authorize', 'rid', request_id, 'at', ARGV[3],
    'outcome', outcome, 'reason', reason, 'label', label, 'reserved', extra, 'd', payload)
end

-- 0. a request id names one request in every partition: one another partition's request holds is not reserved
-- again here (its Settle, found by the index, would close the other's reservation)
local index_key = KEYS[9 + bucket_count]
if index_key then
  local partition = ARGV[15 + 6 * bucket_count]
  if not redis.call('SET', index_key, partition, 'EX', ARGV[16 + 6 * bucket_count], 'NX')
      and redis.call('GET', index_key) ~= partition then
    return {'exists', 'elsewhere', '0'}
  end
end

if redis.call('GET', KEYS[7]) ~= 'open' then
  return {'fenced'}
end

-- 1. a retry of a request already reserved is answered from the reservation, not charged again
local previous_state = redis.call('HGET', KEYS[3], 'state')
if previous_state then
  return {'exists', previous_state, redis.call('HGET', KEYS[3], 'key') == KEYS[1] and '1' or '0'}
end

-- 2. the key: its state and this secret's validity are read here, atomically with the reservation
local key_state = redis.call('HMGET', KEYS[1], 'status', secret_field, 'expires', 'terms')
local status, secret_expiry, key_expiry, key_terms = key_state[1], key_state[2], key_state[3], key_state[4]
local deny_reason = nil
if not status or not secret_expiry then
  deny_reason = 'invalid_api_key'
elseif status == 'revoked' then
  deny_reason = 'key_revoked'
elseif key_expiry and key_expiry ~= '0' and tonumber(key_expiry) <= now_ms then
  deny_reason = 'key_expired'
elseif status == 'paused' then
  deny_reason = 'key_paused'
elseif secret_expiry ~= '0' and tonumber(secret_expiry) <= now_ms then
  deny_reason = 'invalid_api_key'
end
-- a state written before terms were kept has none: nothing to compare
if not deny_reason and key_terms and key_terms ~= '' and key_terms ~= terms then
  return {'stale'}
end
if not deny_reason and end_user ~= '' and (redis.call('HGET', KEYS[8], end_user) or '') ~= end_user_stamp then
  return {'stale', 'end_user'}
end
if not deny_reason and preset_denial ~= '' then
  deny_reason = preset_denial
end
if deny_reason then
  record('deny', deny_reason, '', '0')
  return {'deny', deny_reason, ''}
end

-- 3. concurrency
if concurrency_cap > 0 then
  local inflight = tonumber(redis.call('GET', KEYS[5]) or '0')
  if inflight >= concurrency_cap then
    record('deny', 'concurrency_limit_exceeded', 'concurrency', '0')
    return {'deny', 'concurrency_limit_exceeded', 'concurrency'}
  end
end

-- 4. wallet: a request that holds nothing (a model priced at 0, a promo) spends nothing, whatever the wallet holds
if check_wallet and amount > 0 then
  local wallet = redis.call('HMGET', KEYS[2], 'balance', 'reserved')
  local available = tonumber(wallet[1] or '0') - tonumber(wallet[2] or '0')
  if available < amount then
    record('deny', 'insufficient_quota', 'wallet', '0')
    return {'deny', 'insufficient_quota', 'wallet', fmt(math.max(available, 0))}
  end
end

-- 5. buckets: every hard limit must have room; shadow limits only note that they would deny. A request that puts
-- nothing in a bucket (a free model's in a money limit's) takes no room there: a limit already past (lowered below
-- its count, passed by a settle above its estimate) refuses it no more than one just reached
local shadow = {}
for i = 1, bucket_count do
  local base = 14 + (i - 1) * 6
  local bucket_amount = tonumber(ARGV[base + 1])
  local limit = tonumber(ARGV[base + 2])
  local used = tonumber(redis.call('HGET', KEYS[8 + i], 'used') or '0')
  if bucket_amount > 0 and used + bucket_amount > limit then
    local label = ARGV[base + 6]
    if ARGV[base + 3] == 'shadow' then
      shadow[#shadow + 1] = label
    else
      local key = KEYS[8 + i]
      if redis.call('HSETNX', key, 'reached:' .. label, '1') == 1 then  -- the first refusal of its window: an alert
        keep(key, tonumber(ARGV[base + 4]))
        redis.call('XADD', KEYS[6], '*', 'type', 'alert', 'rid', request_id, 'at', ARGV[3], 'label', label,
          'bucket', key, 'percent', '100', 'reached', '1', 'used', fmt(used), 'limit', ARGV[base + 2], 'd', payload)
      end
      record('deny', 'limit', label, '0')
      return {'deny', 'limit', label, fmt(math.max(limit - used, 0))}
    end
  end
end

-- Past this point nothing can deny: reserve everywhere.
redis.call('HINCRBY', KEYS[2], 'reserved', ARGV[6])
local used_after = {}
local counted = {}  -- bucket key -> its use once this request is counted in it (once, whichever its limits)
for i = 1, bucket_count do
  local base = 14 + (i - 1) * 6
  local key = KEYS[8 + i]
  local used = counted[key]
  if not used then
    used = redis.call('HINCRBY', key, 'used', ARGV[base + 1])
    counted[key] = used
    keep(key, tonumber(ARGV[base + 4]))
  end
  used_after[i] = fmt(used)
  for pct, threshold in string.gmatch(ARGV[base + 5], '(%d+):(%d+)') do
    if used >= tonumber(threshold) and redis.call('HSETNX', key, 'a' .. pct .. ':' .. ARGV[base + 6], '1') == 1 then
      redis.call('XADD', KEYS[6], '*', 'type', 'alert', 'rid', request_id, 'at', ARGV[3],
        'label', ARGV[base + 6], 'bucket', key, 'percent', pct, 'used', fmt(used), 'limit', ARGV[base + 2],
        'd', payload)
    end
  end
end
redis.call('INCR', KEYS[5])
redis.call('HSET', KEYS[3], 'state', 'reserved', 'key', KEYS[1], 'amount', ARGV[6],
  'wallet', check_wallet and '1' or '0', 'expires', expires_ms, 'created', ARGV[3], 'r', reservation_fields)
redis.call('ZADD', KEYS[4], expires_ms, request_id)
local shadow_labels = table.concat(shadow, '|')
record('allow', '', shadow_labels, ARGV[6])
return {'allow', ARGV[6], shadow_labels, table.concat(used_after, ',')}
