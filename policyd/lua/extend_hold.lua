-- extend_hold.lua: a reservation past its deadline that nobody closed, whose request was sent on to the
-- provider: the request has surely ended (the gateway's route timeout is shorter than a reservation's
-- TTL), but a settle may still be on its way (one made again after a Redis outage). Its hold stays until
-- the new deadline; its key's concurrency slot, which no request uses any more, is returned now, once.
--
-- KEYS[1] reservation hash   state = reserved|expired|settled|released; slot = returned once given back
-- KEYS[2] deadlines zset
-- KEYS[3] in-flight counter  of the key
-- KEYS[4] gate               "open" while the partition's counters are whole: else refuse
-- ARGV[1] request_id
-- ARGV[2] the new deadline, unix ms (the reservation's own `expires` stays: it says when it was due)
-- and, for a background response (background.py), its hold kept until the response ends:
-- KEYS[5] event stream             ARGV[3] now, unix ms (the writer keeps the new deadline in SQL, for a rebuild)
-- ... when policyd asks the provider for it:
-- KEYS[6] background polls zset    ARGV[4] when to ask first, unix ms    ARGV[5] what to ask (field `poll`)
-- KEYS[7] polled response          the request's id under its response's, until the new deadline and a minute
-- Returns {"extended"} | {"already", state} | {"unknown"} | {"fenced"}

if redis.call('GET', KEYS[4]) ~= 'open' then
  return {'fenced'}
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return {'unknown'}
end
if state ~= 'reserved' then
  return {'already', state}
end
if redis.call('HSETNX', KEYS[1], 'slot', 'returned') == 1 then
  redis.call('DECR', KEYS[3])
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if KEYS[5] then
  local poll = ''
  if KEYS[6] then
    poll = ARGV[5]
    redis.call('HSET', KEYS[1], 'poll', poll)
    redis.call('ZADD', KEYS[6], ARGV[4], ARGV[1])
    redis.call('SET', KEYS[7], ARGV[1], 'PX', tonumber(ARGV[2]) - tonumber(ARGV[3]) + 60000)
  end
  redis.call('XADD', KEYS[5], '*', 'type', 'poll', 'rid', ARGV[1], 'at', ARGV[3], 'poll', poll, 'until', ARGV[2])
end
return {'extended'}
