-- The URL a Gemini upload's bytes go to, made the gateway's own (Envoy's Lua filter).
--
-- Google's File API begins an upload (POST upload/v1beta/files) with a reply whose x-goog-upload-url names
-- where its bytes go: Google's own host. A client sends them there with no key (the upload id stands for the
-- customer who began it), so through the gateway they must come back to it: the URL's scheme and host become
-- those the client reached the gateway at, its path and query (the upload id) kept. Envoy runs this for the
-- upload path alone. The same rule as http_api.gemini_upload_url, which the ASGI middleware uses.

function envoy_on_request(handle)
  local headers = handle:headers()
  local scheme = headers:get("x-forwarded-proto") or headers:get(":scheme") or "http"
  local host = headers:get(":authority") or ""
  handle:streamInfo():dynamicMetadata():set("policyd.gemini_upload", "origin", scheme .. "://" .. host)
end

function envoy_on_response(handle)
  local headers = handle:headers()
  local url = headers:get("x-goog-upload-url")
  if url == nil then return end
  local found = handle:streamInfo():dynamicMetadata():get("policyd.gemini_upload")
  local rest = url:match("^https?://[^/]+(/.*)$")
  if found ~= nil and found["origin"] ~= nil and rest ~= nil then
    headers:replace("x-goog-upload-url", found["origin"] .. rest)
  end
end
