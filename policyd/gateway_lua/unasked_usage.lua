-- The usage event of a stream whose client did not ask for it, kept from that client (Envoy's Lua filter).
--
-- policyd asks every streamed chat and text completion for its usage (stream_options.include_usage); the
-- provider then ends the stream with one more event, its `choices` empty and the usage in it, which a
-- client that did not ask may not expect (`chunk.choices[0]` fails on it). Envoy runs it only for the
-- requests the deciding filter marked so (x-policyd-unasked-usage: strip, on the request after ext_authz,
-- on the response in the ext_proc shape; what a client or provider sent under that name is dropped first;
-- taken off the response here); it sits before the observer filter in the chain, so
-- the observer reads the provider's own bytes and this takes the event out after it. Every other byte
-- passes as sent, in order; an event is held only until its end (a blank line) arrives, and one the stream
-- never ends is not passed on (an SSE client would not dispatch it either). The same rule as
-- policyd/unasked_usage.py, which the ASGI middleware uses.

local function usage_only(event)
  return event:find('"usage"%s*:%s*{') ~= nil and event:find('"choices"%s*:%s*%[%s*%]') ~= nil
end

local BLANKS = {"\r\n\r\n", "\n\n", "\r\r"}

function envoy_on_response(handle)
  local headers = handle:headers()
  headers:remove("x-policyd-unasked-usage")
  local content_type = headers:get("content-type") or ""
  local encoding = headers:get("content-encoding") or "identity"
  -- a stream compressed anyway (policyd asks for it as it is) passes as sent: its events cannot be seen
  if content_type:find("text/event-stream", 1, true) == nil or encoding ~= "identity" then return end
  headers:remove("content-length")  -- the body shrinks: sent chunked (a server that buffers its events gives one)
  local pending = ""
  for chunk in handle:bodyChunks() do
    local data = pending .. chunk:getBytes(0, chunk:length())
    local kept, start = {}, 1
    local found = {}  -- where each kind of blank line is next found (false: nowhere), each searched forward once
    while true do
      local stop = nil
      for i, blank in ipairs(BLANKS) do
        if found[i] == nil or (found[i] and found[i] - #blank + 1 < start) then
          local _, at = data:find(blank, start, true)
          found[i] = at or false
        end
        if found[i] and (stop == nil or found[i] < stop) then stop = found[i] end
      end
      if stop == nil then break end
      local event = data:sub(start, stop)
      if not usage_only(event) then kept[#kept + 1] = event end
      start = stop + 1
    end
    pending = data:sub(start)
    chunk:setBytes(table.concat(kept))
  end
end
